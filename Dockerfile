# One image for every foodmesh service; the command picks the service:
#
#   docker build -t foodmesh .
#   docker run foodmesh services.catalog --host 0.0.0.0 --port 50051 --metrics-port 9464
#
# What it holds is what the README's "pip install" table says a deployment needs: the
# library with the platform extra (`pip install .[platform]`), the generated stubs
# (`pip install ./protos`, the foodmesh-protos distribution), and the demo services, which are
# never installed and run from a checkout (`python -m services.<name>` from /app).

ARG PYTHON_VERSION=3.11

# --- builder: the wheels, built and installed into a venv that the final stage copies ------
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler only here: a dependency without a wheel for the target platform (arm64, say)
# builds from its sdist; the final image carries none of it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the two distributions are built from (setuptools reads README.md for the
# project's long description); services/ stays out of the wheels, as in pyproject.toml.
COPY pyproject.toml README.md ./
COPY mesh/ mesh/
COPY meshkit/ meshkit/
COPY meshctl/ meshctl/
COPY protos/ protos/
# Not editable (-e) as in .venv: the final stage has no /src.
RUN pip install ./protos ".[platform]"

# --- final: the venv, the services, a user that is not root ---------------------------------
FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=50051
# A fixed uid/gid, so that Kubernetes' runAsNonRoot can check it and volumes can be
# chowned to it (deploy/kubernetes runs the pods as 10001).
RUN groupadd --system --gid 10001 foodmesh \
    && useradd --system --uid 10001 --gid foodmesh --home-dir /home/foodmesh \
        --create-home --shell /usr/sbin/nologin foodmesh
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY services/ services/
# Compiled now, as root, because the running user cannot write here (and Kubernetes mounts
# the root filesystem read-only): no service pays for compiling at every start.
RUN python -m compileall -q services \
    && mkdir -p /data && chown foodmesh:foodmesh /data
USER 10001:10001

# gRPC (PORT: --port must say the same), Prometheus (/metrics), the gateway's HTTP port.
EXPOSE 50051 9464 8081
# grpc.health.v1 through the probe the project ships (exit 0 SERVING; 2 no connection,
# 3 the call failed, 4 not SERVING). Shell form, so that ${PORT} is expanded.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD python -m mesh.health_probe 127.0.0.1:${PORT}

ENTRYPOINT ["python", "-m"]
CMD ["services.catalog", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464"]
