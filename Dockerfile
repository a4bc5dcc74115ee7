FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RELAY_SERVER_DATA_DIR=/var/lib/relay RELAY_SMTP_LISTEN=0.0.0.0:2525
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/relay --create-home relay
USER relay
VOLUME /var/lib/relay
EXPOSE 2525
ENTRYPOINT ["relay"]
CMD ["serve"]
