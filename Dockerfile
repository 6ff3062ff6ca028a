# One image for every OMA service; the command picks the service:
#   docker run oma:1.0.0 oma-service config -nats-url nats://nats:4222 ...
# With no command it runs the whole appliance in one process (embedded NATS, memory database):
#   docker run -p 8082:8082 oma:1.0.0
FROM python:3.11-slim

# The exporter backends of export_manager: nbdkit (default) and nbd-server; libnbd-bin brings
# nbdinfo, with which operators (and the exporter's probes) check an export.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        nbdkit nbd-server libnbd-bin \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY oma ./oma
COPY shared ./shared
COPY services ./services
COPY plugins ./plugins
RUN pip install . && rm -rf /src

# Services run unprivileged; export_manager alone runs as root (block devices, see compose.yaml).
# /var/lib/oma holds the master key (keys/) and the export state (exports/).
RUN useradd --system --uid 10001 --home-dir /var/lib/oma --shell /usr/sbin/nologin oma \
    && mkdir -p /var/lib/oma/keys /var/lib/oma/exports \
    && chown -R oma:oma /var/lib/oma
USER oma
WORKDIR /var/lib/oma

EXPOSE 8082 9101 9102 9103 9104 9105 9106 10809
CMD ["oma-api", "-port", "8082"]
