# Two images from one file: `client` (API, Flower, producers; no torch) and `worker` (adds torch).
# TORCH_SPEC picks the torch build for the worker image (a CUDA build for the GPU pool, the default here).
FROM python:3.11-slim AS client
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY config config
COPY protocol protocol
COPY producers producers
COPY workers workers
COPY inferq inferq
COPY scripts scripts
RUN pip install --no-cache-dir -e ".[server]"
RUN useradd --create-home inferq
USER inferq

FROM client AS worker
USER root
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir -e ".[worker]" \
    && python scripts/make_weights.py && chown -R inferq /app/models
USER inferq
