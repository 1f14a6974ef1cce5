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

# shellcheck source=deploy/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/deploy/common.sh"
deploy_main hil-worker "$@"
