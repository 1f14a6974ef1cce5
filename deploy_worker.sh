#!/usr/bin/env bash
# Deploy and run the DevCloud Worker (relay mode: the intranet side that talks to WeCom for the HIL Server).
#   ./deploy_worker.sh         install (if the checkout's .venv is missing), then start
#   ./deploy_worker.sh install|start|stop|restart|status|logs
# Settings: the environment, then the env file WORKER_ENV_FILE (default ./worker.env, see deploy/worker.env.example;
#   create it private: install -m 600 deploy/worker.env.example worker.env).
# BOT_KEY is required. HIL_URL is the server's WebSocket, e.g. wss://your-domain.com/ws.
# Files: VENV (default: the checkout's .venv, the one ./hil uses), and, relative to the current directory,
# PID_FILE (./hil-worker.pid) and LOG_FILE (./worker.log).
# For a service managed by systemd, see deploy/hil-worker.service instead.
set -euo pipefail

DEPLOY_NAME="hil-worker"
DEPLOY_MODULE="devcloud_worker.worker"
DEPLOY_ENV_VAR="WORKER_ENV_FILE"
DEPLOY_ENV_DEFAULT="./worker.env"
DEPLOY_HOST_VAR="CALLBACK_HOST"
DEPLOY_PORT_VAR="CALLBACK_PORT"
DEPLOY_PORT_DEFAULT=8082
DEPLOY_PID_DEFAULT="./hil-worker.pid"
DEPLOY_LOG_DEFAULT="./worker.log"
DEPLOY_REQUIRE="BOT_KEY"
DEPLOY_REQUIRE_HINT="the WeCom robot's webhook key"

# shellcheck source=deploy/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/deploy/common.sh"
deploy_main "$@"
