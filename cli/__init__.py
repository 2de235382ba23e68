"""The `pixelmill` command line (cli/main.py) and the local services it starts and stops: the
Prefect server (server.py), the kept local Ray (localray.py), the GCS emulator (emulator.py) and
the gallery's web server (serve.py). The only room that starts processes; it may import flows."""
