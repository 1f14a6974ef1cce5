#!/usr/bin/env bash
# Deploy and run the HIL Server on a Linux host (the public side; it also runs alone in direct mode).
#   ./deploy_hil.sh            install (if the checkout's .venv is missing), then start
#   ./deploy_hil.sh install|start|stop|restart|status|logs
# Settings: the environment, then the env file HIL_ENV_FILE (default ./hil.env, see deploy/hil.env.example;
#   create it private: install -m 600 deploy/hil.env.example hil.env).
# Files: VENV (default: the checkout's .venv, the one ./hil uses), and, relative to the current directory,
# PID_FILE (./hil-server.pid) and LOG_FILE (./hil.log).
# For a service managed by systemd, see deploy/hil-server.service instead.
set -euo pipefail

DEPLOY_NAME="hil-server"
DEPLOY_MODULE="hil_server.app"
DEPLOY_ENV_VAR="HIL_ENV_FILE"
DEPLOY_ENV_DEFAULT="./hil.env"
DEPLOY_HOST_VAR="HIL_HOST"
DEPLOY_PORT_VAR="HIL_PORT"
DEPLOY_PORT_DEFAULT=8081
DEPLOY_PID_DEFAULT="./hil-server.pid"
DEPLOY_LOG_DEFAULT="./hil.log"
DEPLOY_REQUIRE=""
DEPLOY_REQUIRE_HINT=""

# shellcheck source=deploy/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/deploy/common.sh"
deploy_main "$@"
