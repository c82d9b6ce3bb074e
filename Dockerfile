# syntax=docker/dockerfile:1
# kms-sidecar container image.
#
#   docker build -t kms-sidecar .
#   docker run -d --name kms-sidecar \
#       -v /etc/kms-sidecar:/etc/kms-sidecar:ro \
#       -v kms-sidecar-run:/run/kms-sidecar \
#       -e VAULT_TOKEN -e KMS_AUDIT_HMAC_KEY \
#       kms-sidecar
#
# The configuration (and its policies/) is mounted at /etc/kms-sidecar. Workload containers
# mount the same /run/kms-sidecar volume to reach the socket. The sidecar runs as uid/gid 10001.
# With socket_mode "0660", callers must run with that gid (or as that uid), and policies name
# their uids.

# -- build: a wheel for the sidecar and for each of its dependencies ---------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

# -- runtime: the wheels only, no compiler, no source tree --------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 kms \
 && useradd --system --uid 10001 --gid kms --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kms \
 && install -d -o kms -g kms -m 0755 /run/kms-sidecar \
 && install -d -o kms -g kms -m 0750 /var/log/kms-sidecar \
 && install -d -o root -g kms -m 0750 /etc/kms-sidecar

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl

USER 10001:10001
VOLUME ["/run/kms-sidecar"]

# Healthy when /v1/sys/health answers 200 on the socket (unauthenticated by design). The path
# below must match server.socket in the configuration.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect('/run/kms-sidecar/sidecar.sock'); s.sendall(b'GET /v1/sys/health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n'); sys.exit(0 if s.recv(16).startswith(b'HTTP/1.1 200') else 1)"]

ENTRYPOINT ["kms-sidecar"]
CMD ["run", "--config", "/etc/kms-sidecar/sidecar.toml"]
