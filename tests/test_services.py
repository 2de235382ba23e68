"""pixelmill's kept Prefect server and Ray keep to themselves: they listen on loopback only, a
plain `ray.init()` elsewhere on the machine gets a Ray of its own while they run and after they
stop, two commands starting them at once make one of each, a crashed server comes back where it
was, a server pixelmill did not start is never taken for its own, and another program can join
pixelmill's Ray on purpose with the variables `pixelmill server status` prints."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli import localray, server, warm
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
PIXELMILL = str(ROOT / ".venv/bin/pixelmill")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# A plain ray.init() starts a local Ray in 5-10 s here; a driver that hangs on a cluster it
# cannot reach retries for minutes.
PROBE_TIMEOUT_S = 120

PLAIN_PROBE = """
import ray
ray.init(log_to_driver=False)
print("cluster", ray.get_runtime_context().gcs_address)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))
ray.shutdown()
"""
JOIN_PROBE = """
import os, ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
print("cluster", ray.get_runtime_context().gcs_address)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))
ray.shutdown()
"""


# --- what /proc says: processes and their listening TCP sockets ---------------------------

def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, session id) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid, pgid, sid = stat[stat.rindex(")") + 2:].split()[1:4]
            table[int(entry.name)] = (int(ppid), int(pgid), int(sid))
    return table


def _trees(leaders: set[int]) -> set[int]:
    """The processes whose group or session one of `leaders` leads, and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, pgid, sid) in table.items() if pgid in leaders or sid in leaders}
    while True:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _listening() -> dict[str, tuple[str, int]]:
    """'socket:[inode]' -> (address, port) of every listening TCP socket."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].split(":")
                sockets[f"socket:[{fields[9]}]"] = (_address(address), int(port, 16))
    return sockets


def _listeners(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command) of every listening socket the processes hold."""
    sockets, found = _listening(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in sockets:
                found.append((*sockets[target], pid, command[:90]))
    return sorted(set(found))


def _belonging(*texts: str) -> set[int]:
    """Processes whose working folder, command line or environment names one of `texts` (the
    pixelmill home, the Ray temp dir): what pixelmill started for that home, whatever group."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            raw = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(cwd.startswith(text) or text.encode() in raw for text in texts):
            found.add(int(entry.name))
    return found


# --- helpers ------------------------------------------------------------------------------

def _env(home: Path) -> dict[str, str]:
    """This session's environment for a pixelmill command on `home`, without RAY_* variables."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_") and key != "PREFECT_API_URL"}
    env["PIXELMILL_HOME"] = str(home)
    return env


def _pixelmill(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PIXELMILL, *args], env=_env(home), capture_output=True, text=True,
                          timeout=timeout, cwd=home)


def _probe(code: str, env: dict[str, str], cwd: Path) -> str:
    """Run a Ray driver in a session of its own; returns its output. Its processes and the
    local Ray it may have started (whose session files are under TMPDIR/ray/) must be gone
    once it returns."""
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    own_ray = f"{env['TMPDIR']}/ray/".encode()

    def leftovers() -> set[int]:
        found = _trees({process.pid})
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and own_ray in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
        return found

    try:
        output, _ = process.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the driver hung for {PROBE_TIMEOUT_S} s:\n{output[-3000:]}")
    finally:
        left = _wait_gone(leftovers, timeout=30)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert not left, f"the driver's Ray outlived ray.shutdown(): {left}"
    assert "answer 42" in output, output[-3000:]
    return output


def _cluster(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("cluster "))


def _wait_gone(find, timeout: float = 20.0) -> set[int]:
    """Poll `find()` until it is empty or `timeout` passes; returns the last answer."""
    deadline = time.monotonic() + timeout
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _plain_env(machine_tmp: Path) -> dict[str, str]:
    """An unrelated program's environment: nothing of Ray's or pixelmill's, on a machine whose
    temp folder is `machine_tmp` (see `services`)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "PIXELMILL_", "PREFECT_"))}
    env["TMPDIR"] = str(machine_tmp)
    return env


# --- the kept services, started by two commands at once -----------------------------------

@dataclass
class Services:
    home: Path
    machine_tmp: Path  # the machine's temp folder, where Ray records its "current cluster"
    racers: list[subprocess.Popen]
    outputs: list[tuple[str, str]]

    def server(self) -> dict:
        return json.loads((self.home / "server.json").read_text())

    def ray(self) -> dict:
        return json.loads((self.home / "ray.json").read_text())

    def warm(self) -> dict:
        return json.loads((self.home / "warm.json").read_text())

    def processes(self) -> set[int]:
        """Every process of pixelmill's server and Ray for this home."""
        recorded, ray_info = self.server(), self.ray()
        return (_trees({recorded["pid"], ray_info["pid"]})
                | _belonging(*self.places()))

    def places(self) -> list[str]:
        """The folders whose mention makes a process one of this home's."""
        return [str(self.home), *filter(None, [self.ray().get("temp_dir")])]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Two `pixelmill server start` racing in a fresh home (a long path, as a user's may be).
    They and the plain programs below share a temp folder of their own (TMPDIR, which Ray
    honours), so Ray clusters that other programs left on the test machine cannot be its
    default and every plain ray.init() here starts from a clean machine."""
    home = tmp_path_factory.mktemp("services") / "a-pixelmill-home-with-a-rather-long-path"
    home.mkdir()
    # short, as Ray's unix sockets under it need
    machine_tmp = Path(tempfile.mkdtemp(prefix="pixelmill-test-", dir="/tmp"))
    env = {**_env(home), "TMPDIR": str(machine_tmp)}
    racers = [subprocess.Popen([PIXELMILL, "server", "start"], env=env, cwd=home,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        outputs = [racer.communicate(timeout=300) for racer in racers]
        yield Services(home, machine_tmp, racers, outputs)
    finally:
        _pixelmill(home, "server", "stop", timeout=120)
        localray.stop(home)
        server.stop(home)
        shutil.rmtree(machine_tmp, ignore_errors=True)


def _not_the_machine_default(services: Services) -> None:
    """pixelmill's Ray never is the cluster a plain ray.init() on this machine joins."""
    current = services.machine_tmp / "ray" / "ray_current_cluster"
    assert not current.exists(), current.read_text()


def test_two_commands_starting_at_once_make_one_server_and_one_ray(services):
    for racer, (stdout, stderr) in zip(services.racers, services.outputs):
        assert racer.returncode == 0, stdout + stderr[-3000:]
    recorded, ray_info = services.server(), services.ray()
    # both were told the same server and the same Ray
    stdout = services.outputs[0][0]
    assert services.outputs[1][0] == stdout
    assert f"running: pid {recorded['pid']}" in stdout
    assert f"ray: pid {ray_info['pid']}, address {ray_info['address']}" in stdout
    # and nothing else was started for this home: every process of it is in one of the
    # three, the third pixelmill's warm host for commands
    groups = {_processes()[pid][1] for pid in services.processes()}
    assert groups == {recorded["pid"], ray_info["pid"], services.warm()["pid"]}
    # its session files are in a folder of its own, this user's only
    assert Path(ray_info["temp_dir"]).parent.stat().st_mode & 0o777 == 0o700


def test_every_listening_port_of_the_kept_services_is_on_loopback(services):
    recorded, ray_info = services.server(), services.ray()
    # the scan must see the Prefect API, the Ray GCS and the Ray client server, the last of
    # them to listen, so an empty or early answer cannot pass
    expected = {int(recorded["url"].split(":")[2].split("/")[0]),
                int(ray_info["address"].rsplit(":", 1)[1])}
    command = Path(f"/proc/{ray_info['pid']}/cmdline").read_bytes().split(b"\0")
    if b"--ray-client-server-port" in command:
        expected.add(int(command[command.index(b"--ray-client-server-port") + 1]))
    deadline = time.monotonic() + 30
    while True:
        sockets = _listeners(services.processes())
        ports = {port for _, port, _, _ in sockets}
        if expected <= ports or time.monotonic() > deadline:
            break
        time.sleep(1)
    print("\n".join(map(str, sockets)))
    assert expected <= ports
    assert len(sockets) >= 6, sockets  # GCS, raylet, agents, client server: Ray has many
    exposed = [entry for entry in sockets if entry[0] not in LOOPBACK]
    assert not exposed, exposed


def test_plain_ray_init_elsewhere_gets_its_own_ray_while_pixelmills_runs(services, tmp_path):
    ray_info = services.ray()
    _not_the_machine_default(services)
    output = _probe(PLAIN_PROBE, _plain_env(services.machine_tmp), tmp_path)
    assert _cluster(output) != ray_info["address"]
    assert Path(ray_info["temp_dir"], "ray_current_cluster").exists()  # Ray records it there


def test_status_prints_how_another_program_joins_pixelmills_ray(services, tmp_path):
    ray_info = services.ray()
    status = _pixelmill(services.home, "server", "status", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(line for line in status.stdout.splitlines() if "export " in line)
    recipe = dict(word.split("=", 1) for word in shlex.split(line.split("export ", 1)[1]))
    assert recipe["RAY_ADDRESS"] == ray_info["address"]
    output = _probe(JOIN_PROBE, {**_plain_env(services.machine_tmp), **recipe}, tmp_path)
    assert _cluster(output) == ray_info["address"]


def test_stop_leaves_nothing_and_plain_ray_init_still_works(services, tmp_path):
    ray_info, places = services.ray(), services.places()
    before = services.processes()
    assert len(before) > 5
    stop = _pixelmill(services.home, "server", "stop", timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"stopped ray pid {ray_info['pid']}" in stop.stdout
    left = _wait_gone(lambda: {pid for pid in before if server.alive(pid)}
                      | _belonging(*places))
    assert not left, [server.command_line(pid) for pid in left]
    _not_the_machine_default(services)
    output = _probe(PLAIN_PROBE, _plain_env(services.machine_tmp), tmp_path)
    assert _cluster(output) != ray_info["address"]
    assert not Path(ray_info["temp_dir"]).parent.exists()


# --- the server alone ---------------------------------------------------------------------

def _variable(url: str, name: str, value: str | None = None) -> str:
    """Write (with `value`) or read a Prefect variable through the REST API."""
    if value is not None:
        request = urllib.request.Request(f"{url}/variables/", method="POST",
                                         data=json.dumps({"name": name, "value": value}).encode(),
                                         headers={"Content-Type": "application/json"})
    else:
        request = urllib.request.Request(f"{url}/variables/name/{name}")
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["value"]


def _crash(pid: int) -> None:
    """SIGKILL a server's process group, as a crash would, and wait until it is gone."""
    os.killpg(pid, signal.SIGKILL)
    assert not _wait_gone(lambda: set(server.group_members(pid)))


@contextmanager
def _squatting(port: int) -> Iterator[None]:
    """Another program listens on `port` (unless one already does)."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        try:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
        except OSError:
            pass
        yield


def test_a_crashed_server_comes_back_on_its_port_with_its_database(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    try:
        # it starts on some port other than the default one, taken now but free later
        with _squatting(server.PREFERRED_PORT):
            first = _pixelmill(home, "server", "start", "--no-ray")
        assert first.returncode == 0, first.stdout + first.stderr
        before = server.ServerInfo(**json.loads((home / "server.json").read_text()))
        assert before.port != server.PREFERRED_PORT
        _variable(before.url, "made-before-the-crash", "kept")
        _crash(before.pid)

        again = _pixelmill(home, "server", "start", "--no-ray")
        assert again.returncode == 0, again.stdout + again.stderr
        after = server.ServerInfo(**json.loads((home / "server.json").read_text()))
        assert after.url == before.url and after.pid != before.pid
        assert _variable(after.url, "made-before-the-crash") == "kept"
        _crash(after.pid)

        with _squatting(before.port):  # another program takes the port meanwhile
            moved = _pixelmill(home, "server", "start", "--no-ray")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        last = server.ServerInfo(**json.loads((home / "server.json").read_text()))
        assert last.port != before.port
        assert f"port {before.port}" in moved.stderr and f"port {last.port}" in moved.stderr
        assert _variable(last.url, "made-before-the-crash") == "kept"
    finally:
        server.stop(home)
        warm.stop(home)


class _Health(BaseHTTPRequestHandler):
    """Answers Prefect's health check, like a Prefect server pixelmill did not start."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def foreign_server():
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        yield other
    finally:
        other.shutdown()
        other.server_close()


def test_a_server_that_took_the_port_first_is_never_adopted(tmp_path, foreign_server):
    """Another server binds the chosen port between pixelmill's check and its server's bind:
    the health check answers, from the wrong server; pixelmill's own exits, and start fails."""
    port = foreign_server.server_address[1]
    with pytest.raises(RuntimeError, match="prefect server exited"):
        server.start(base=tmp_path, port=port, timeout=60)
    assert not (tmp_path / "server.json").exists()


def test_a_record_whose_pid_is_not_pixelmills_server_is_never_used_or_killed(
        tmp_path, foreign_server):
    """After a reboot the recorded pid may be anyone's, and the port anyone's server."""
    port = foreign_server.server_address[1]
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "server.json").write_text(json.dumps(
            {"url": f"http://127.0.0.1:{port}/api", "pid": bystander.pid, "log": "x"}))
        assert server.running(tmp_path) is None
        assert server.stop(tmp_path) is None
        assert bystander.poll() is None
        assert not (tmp_path / "server.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_ray_session_files_stay_in_pixelmill_home_when_their_socket_paths_fit(tmp_path):
    short = Path("/tmp") / f"pixelmill-test-{os.getpid()}"
    long = tmp_path / ("deep-" * 12)
    short.mkdir()
    inside = fallback = Path("/nonexistent/tmp")
    try:
        inside, fallback = localray.temp_dir(short), localray.temp_dir(long)
        assert inside.parent == short / "ray"
        assert fallback.parent.parent == Path("/tmp")
        assert fallback.parent.name.startswith("pixelmill-ray-")
        for chosen in (inside, fallback):
            assert chosen.parent.stat().st_mode & 0o777 == 0o700  # this user's only
            socket_path = f"{chosen}/session_2026-11-24_02-46-38_844002_4194304/sockets/raylet"
            assert len(socket_path) <= 103  # macOS's limit, the smaller of the two
    finally:
        localray.remove_temp_dir(short, inside)
        localray.remove_temp_dir(long, fallback)
        short.rmdir()  # empty again
    assert not fallback.parent.exists()
    localray.remove_temp_dir(tmp_path, tmp_path / "tmp")  # not one it made: kept
    assert tmp_path.exists()
