FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install '.[postgres]' \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin agnes \
    && mkdir -p /data /etc/agnes-gateway \
    && chown agnes /data

USER agnes
VOLUME ["/data"]
EXPOSE 8080

# The config (mounted at /etc/agnes-gateway/config.yaml) should say `database: /data/agnes-gateway.db`
# (or a postgresql:// URL shared by several replicas) and `listen: {host: 0.0.0.0}` with `clients:` configured.
ENV AGNES_GATEWAY_CONFIG=/etc/agnes-gateway/config.yaml
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"

ENTRYPOINT ["agnes-gateway"]
CMD ["serve"]
