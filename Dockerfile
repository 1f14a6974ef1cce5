# One image for every process: the first argument picks it (server | worker | mcp | sandbox | fake-wecom).
#   docker build -t hil-mcp .
#   docker run -d -p 8081:8081 -v hil-data:/data -e HIL_WORKER_TOKEN=... hil-mcp server
#   docker run -d -v worker-data:/data -e HIL_URL=wss://your-domain/ws -e HIL_TOKEN=... -e BOT_KEY=... hil-mcp worker
#   docker run --rm -p 8081:8081 -p 8090:8090 hil-mcp sandbox     # then open http://localhost:8090/
# docker-compose.yml runs relay mode (server + worker) and, with --profile demo, a fake WeCom.

FROM python:3.12-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HIL_DATA_DIR=/data
COPY --from=build /wheels /wheels
RUN pip install "$(echo /wheels/*.whl)[server]" && rm -rf /wheels
COPY deploy/docker-entrypoint.sh /usr/local/bin/hil-entrypoint
RUN chmod 0755 /usr/local/bin/hil-entrypoint \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin hil \
    && mkdir -p /data \
    && chown hil:hil /data
# Settings come from the environment (a .env in the working directory would be read too; there is none).
WORKDIR /app
USER hil
VOLUME ["/data"]
EXPOSE 8081 8082 8090
ENTRYPOINT ["hil-entrypoint"]
CMD ["server"]
