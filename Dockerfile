# The image a Prefect Docker / Cloud Run (v2) work pool runs, and a plain Cloud Run job too.
#   docker build -t REGISTRY/pixelmill:$(git rev-parse --short HEAD) .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=pixelmill \
    PIXELMILL_HOME=/home/pixelmill/.pixelmill

WORKDIR /app

# Dependencies first, pinned by constraints.txt: this layer is reused until they change.
COPY pyproject.toml constraints.txt deployments/requirements.py ./
RUN python requirements.py pyproject.toml > requirements.txt \
    && pip install -r requirements.txt -c constraints.txt

# Then the code (flows/tasks/pixelmill are importable by Ray workers in the image; cli is the
# pixelmill command).
COPY README.md ./
COPY pixelmill ./pixelmill
COPY tasks ./tasks
COPY flows ./flows
COPY cli ./cli
COPY deployments ./deployments
COPY prefect.yaml ./
RUN pip install --no-deps . -c constraints.txt

RUN useradd --create-home --uid 10001 pixelmill
USER pixelmill

ENTRYPOINT ["/app/deployments/entrypoint.sh"]
CMD ["pixelmill", "--help"]
