# One image for every service of orders-export (api, relay, worker, notifier, migrate).
FROM python:3.11.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir . && useradd --system --uid 10001 app
USER app
EXPOSE 8000
# Access logs stay on (signatures of download links are redacted by the app); X-Forwarded-For
# is read by the app only from TRUSTED_PROXIES, so uvicorn's own rewriting is off.
CMD ["uvicorn", "services.api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--no-proxy-headers", "--no-server-header"]
