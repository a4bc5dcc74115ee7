# Relay's image: `relay serve` as the non-root user "relay", data in /var/lib/relay (0700).
#
#   docker build -t relay .
#   docker run -v relay-data:/var/lib/relay -p 127.0.0.1:2525:2525 -p 127.0.0.1:8025:8025 relay
#
# Configure with RELAY_<SECTION>_<KEY> variables (RELAY_STORE_URL, RELAY_HTTP_API_TOKENS, ...)
# or a TOML file mounted read-only: `-v ./relay.toml:/etc/relay/relay.toml:ro -e RELAY_CONFIG=/etc/relay/relay.toml`.
# deploy/docker-compose.yml runs two of these on one PostgreSQL database.
# Worker processes: one per CPU the container may use ([server] processes = "auto" reads its
# cgroup quota, so `docker run --cpus 2` runs two on any host); RELAY_SERVER_PROCESSES=N sets N.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RELAY_SERVER_DATA_DIR=/var/lib/relay \
    RELAY_SMTP_LISTEN=0.0.0.0:2525 \
    RELAY_HTTP_LISTEN=0.0.0.0:8025

WORKDIR /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
# uvloop is one of Relay's own dependencies (Linux): the event loop `relay serve` runs on.
RUN pip install --no-cache-dir . \
 && python -c "import uvloop" \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/relay --no-create-home --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0700 /var/lib/relay

USER relay
WORKDIR /var/lib/relay
VOLUME /var/lib/relay
# SMTP (intake) and HTTP (API, /metrics, /healthz, the console): bind them to the host's
# loopback or a private network, never to the world without TLS and AUTH (see deploy/).
EXPOSE 2525 8025
# Liveness on the HTTP listener's port (RELAY_HTTP_LISTEN); the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request as u; p = os.environ.get('RELAY_HTTP_LISTEN', '0.0.0.0:8025').rsplit(':', 1)[1]; u.urlopen('http://127.0.0.1:' + p + '/healthz', timeout=4)"
# SIGTERM is a graceful stop: sessions and attempts in flight get [smtp]/[delivery] shutdown_grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve"]
