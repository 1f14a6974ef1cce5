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

# shellcheck source=deploy/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/deploy/common.sh"
deploy_main hil-server "$@"
