# FedInspect server: the training-cycle API (fedinspect server).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch: the CUDA build is 5 GB and a server without a GPU never uses it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fl_core ./fl_core
COPY server_service ./server_service
COPY edge_service ./edge_service
COPY fedinspect ./fedinspect
# the postgres and s3 extras: a replica of the scaled-out setup (docker-compose.scale.yml)
RUN pip install '.[postgres,s3]'

RUN useradd --create-home --uid 10001 fedinspect \
    && mkdir -p /data && chown fedinspect:fedinspect /data
USER fedinspect

ENV FEDINSPECT_SERVER_HOST=0.0.0.0 \
    FEDINSPECT_SERVER_PORT=8000 \
    FEDINSPECT_SERVER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["fedinspect", "server"]
