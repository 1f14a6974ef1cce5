#!/bin/sh
# The container's entry point: the first argument picks the process, the rest go to it.
#   docker run IMAGE server              HIL Server (hil-server), port 8081
#   docker run IMAGE worker              DevCloud Worker (hil-worker), callback port 8082
#   docker run -i IMAGE mcp --help       MCP server on stdio (hil-mcp)
#   docker run IMAGE sandbox             fake WeCom (8090) + HIL Server in direct mode (8081), in one process
#   docker run IMAGE fake-wecom ...      the fake WeCom robot API alone (python -m hil_sandbox.fake_wecom)
# Settings come from the environment (see README); HIL_DATA_DIR is /data, a volume.
set -eu

usage() {
  echo "usage: docker run IMAGE server|worker|mcp|sandbox|fake-wecom [args...]" >&2
}

cmd="${1:-server}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
  server) exec hil-server "$@" ;;
  worker) exec hil-worker "$@" ;;
  mcp) exec hil-mcp "$@" ;;
  # In a container the sandbox must listen on every interface to be reachable through -p.
  sandbox) exec hil-sandbox --host 0.0.0.0 --data-dir "${HIL_DATA_DIR:-/data}/sandbox" "$@" ;;
  fake-wecom) exec python -m hil_sandbox.fake_wecom --host 0.0.0.0 --port 8090 "$@" ;;
  -h | --help | help) usage; exit 0 ;;
  *) echo "unknown command: $cmd" >&2; usage; exit 2 ;;
esac
