# FedInspect edge agent: extraction, fine-tuning, serving (fedinspect edge).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch: edges on a factory floor run on CPUs.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fl_core ./fl_core
COPY server_service ./server_service
COPY edge_service ./edge_service
COPY fedinspect ./fedinspect
# the demo extra brings the elpv images (CC BY-NC-SA 4.0) the compose edges train on
RUN pip install ".[demo]"

RUN useradd --create-home --uid 10001 fedinspect \
    && mkdir -p /data && chown fedinspect:fedinspect /data
USER fedinspect

ENV FEDINSPECT_EDGE_HOST=0.0.0.0 \
    FEDINSPECT_EDGE_PORT=8100 \
    FEDINSPECT_EDGE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8100

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"]

CMD ["fedinspect", "edge"]
