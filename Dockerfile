FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RELAY_SERVER_DATA_DIR=/var/lib/relay \
    RELAY_SMTP_LISTEN=0.0.0.0:2525 \
    RELAY_HTTP_LISTEN=0.0.0.0:8025
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/relay --create-home relay
USER relay
VOLUME /var/lib/relay
EXPOSE 2525 8025
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8025/healthz', timeout=4)"
ENTRYPOINT ["relay"]
CMD ["serve"]
