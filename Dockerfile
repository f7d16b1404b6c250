# The kvmesh image: watchers, workers, simulators and Flower all run from it.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
RUN pip install --disable-pip-version-check . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin kvmesh
USER kvmesh
ENV KVMESH_CONFIG=/etc/kvmesh/mesh.toml
CMD ["kvmesh", "--help"]
