# shellcheck shell=bash
# Shared logic of deploy_hil.sh and deploy_worker.sh: install / start / stop / restart / status / logs.
# Sourced, not run, by those scripts, which then call: deploy_main <service> "$@" (hil-server or hil-worker).
# It finds the checkout from its own path (DEPLOY_ROOT, which holds requirements.txt and pyproject.toml) and names the
# calling script in usage lines (DEPLOY_SCRIPT); deploy_service says how the two services differ.
#
# The virtualenv is the checkout's .venv, the same one ./hil uses (VENV or HIL_VENV overrides it); the package is
# installed editable, so after `git pull` a restart runs the new code (run `install` again when dependencies change).
# PID_FILE, LOG_FILE and the env file are relative to the current directory.
# Secret values are never printed: only variable names appear in messages.

DEPLOY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY_SCRIPT="$(basename "$0")"

# How the two services differ, setting:
#   DEPLOY_NAME          name shown in messages, e.g. hil-server (and the default pid file ./<name>.pid)
#   DEPLOY_MODULE        the Python module to run (python -m ...)
#   DEPLOY_ENV_VAR       the variable naming the env file (e.g. HIL_ENV_FILE); DEPLOY_ENV_DEFAULT its default
#   DEPLOY_HOST_VAR      the variable holding the listen host (e.g. HIL_HOST)
#   DEPLOY_PORT_VAR      the variable holding the port (e.g. HIL_PORT); DEPLOY_PORT_DEFAULT its default
#   DEPLOY_LOG_DEFAULT   default log file
#   DEPLOY_REQUIRE       a variable that must be non-empty to start (or none); DEPLOY_REQUIRE_HINT what it is
deploy_service() {
  DEPLOY_NAME="$1"
  DEPLOY_PID_DEFAULT="./$1.pid"
  DEPLOY_REQUIRE="" DEPLOY_REQUIRE_HINT=""
  case "$1" in
    hil-server)
      DEPLOY_MODULE="hil_server.app" DEPLOY_ENV_VAR="HIL_ENV_FILE" DEPLOY_ENV_DEFAULT="./hil.env"
      DEPLOY_HOST_VAR="HIL_HOST" DEPLOY_PORT_VAR="HIL_PORT" DEPLOY_PORT_DEFAULT=8081 DEPLOY_LOG_DEFAULT="./hil.log"
      ;;
    hil-worker)
      DEPLOY_MODULE="devcloud_worker.worker" DEPLOY_ENV_VAR="WORKER_ENV_FILE" DEPLOY_ENV_DEFAULT="./worker.env"
      DEPLOY_HOST_VAR="CALLBACK_HOST" DEPLOY_PORT_VAR="CALLBACK_PORT" DEPLOY_PORT_DEFAULT=8082
      DEPLOY_LOG_DEFAULT="./worker.log" DEPLOY_REQUIRE="BOT_KEY" DEPLOY_REQUIRE_HINT="the WeCom robot's webhook key"
      ;;
    *) printf 'deploy: unknown service %s (hil-server or hil-worker)\n' "$1" >&2; exit 2 ;;
  esac
}

deploy_say() { printf '%s: %s\n' "$DEPLOY_NAME" "$*"; }
deploy_die() { printf '%s: error: %s\n' "$DEPLOY_NAME" "$*" >&2; exit 1; }

# Load the env file (KEY=value lines, shell syntax) with `set -a`. Variables already set in the
# environment win over the file, as they do for the programs themselves (environment > .env > default).
deploy_load_env() {
  local explicit="${!DEPLOY_ENV_VAR:-}"
  local file="${explicit:-$DEPLOY_ENV_DEFAULT}"
  DEPLOY_ENV_FILE=""
  if [ ! -f "$file" ]; then
    [ -z "$explicit" ] || deploy_die "$DEPLOY_ENV_VAR=$file: no such file"
    return 0
  fi
  # Check it in a separate shell first, with its output dropped: an error message could quote a value.
  if ! bash -c 'set -ae; . "$1"' deploy-env "$file" >/dev/null 2>&1; then
    deploy_die "cannot load $file: check its syntax (KEY=value lines; quote values with spaces)"
  fi
  local -A keep=()
  local line name
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)= ]]; then
      name="${BASH_REMATCH[2]}"
      if [ -n "${!name+set}" ]; then keep[$name]="${!name}"; fi
    fi
  done <"$file"
  set -a
  # shellcheck disable=SC1090
  . "$file"
  set +a
  for name in "${!keep[@]}"; do
    printf -v "$name" '%s' "${keep[$name]}"
    export "${name?}"
  done
  DEPLOY_ENV_FILE="$file"
  local mode
  mode="$(stat -c %a "$file" 2>/dev/null || true)"
  if [[ $mode =~ [1-7]$ ]]; then
    deploy_say "warning: $file is readable by other users; it holds secrets (chmod 600 $file)" >&2
  fi
}

deploy_setup() {
  deploy_load_env
  VENV="${VENV:-${HIL_VENV:-$DEPLOY_ROOT/.venv}}"
  PID_FILE="${PID_FILE:-$DEPLOY_PID_DEFAULT}"
  LOG_FILE="${LOG_FILE:-$DEPLOY_LOG_DEFAULT}"
  START_TIMEOUT="${START_TIMEOUT:-15}"
  STOP_TIMEOUT="${STOP_TIMEOUT:-15}"
  DEPLOY_PYTHON="$VENV/bin/python"
  DEPLOY_PORT="${!DEPLOY_PORT_VAR:-$DEPLOY_PORT_DEFAULT}"
  [[ $DEPLOY_PORT =~ ^[0-9]+$ ]] || deploy_die "$DEPLOY_PORT_VAR must be a port number"
  # Probe the address the program listens on; a wildcard address is reachable on loopback.
  local host="${!DEPLOY_HOST_VAR:-0.0.0.0}"
  case "$host" in
    "" | 0.0.0.0 | :: | "[::]") host=127.0.0.1 ;;
    *:*) host="[${host#[}"; host="${host%]}]" ;;
  esac
  DEPLOY_HEALTH_HOST="$host"
  HEALTH_URL="${HEALTH_URL:-http://$host:$DEPLOY_PORT/health}"
}

# The pid from the pid file when that process is alive and is ours (a reused pid is not).
deploy_pid() {
  local pid
  [ -f "$PID_FILE" ] || return 1
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [ -n "$pid" ] || return 1
  deploy_is_ours "$pid" || return 1
  printf '%s\n' "$pid"
}

deploy_is_ours() {
  local pid="$1" cmd
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  else
    cmd="$(ps -o args= -p "$pid" 2>/dev/null || true)"
  fi
  [[ $cmd == *"$DEPLOY_MODULE"* ]]
}

# Print the health JSON; non-zero when the endpoint does not answer 2xx.
deploy_health() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --noproxy '*' --max-time 3 "$HEALTH_URL"
  else
    "$DEPLOY_PYTHON" - "$HEALTH_URL" <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=3) as r:
    print(r.read().decode())
PY
  fi
}

deploy_port_busy() {
  local host="${DEPLOY_HEALTH_HOST#[}"
  host="${host%]}"
  # shellcheck disable=SC2016  # $1/$2 expand in the inner shell
  timeout 2 bash -c ': >"/dev/tcp/$1/$2"' deploy-probe "$host" "$DEPLOY_PORT" 2>/dev/null
}

deploy_tail_log() {
  if [ -f "$LOG_FILE" ]; then
    printf -- '--- last lines of %s ---\n' "$LOG_FILE" >&2
    tail -n "$1" "$LOG_FILE" >&2
  fi
}

deploy_install() {
  local py="${PYTHON:-python3}"
  command -v "$py" >/dev/null 2>&1 || deploy_die "$py not found (set PYTHON to a Python >= 3.11)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || deploy_die "$py is older than Python 3.11"
  if [ ! -x "$DEPLOY_PYTHON" ]; then
    deploy_say "creating virtualenv $VENV"
    "$py" -m venv "$VENV"
  fi
  deploy_say "installing $DEPLOY_ROOT into $VENV"
  "$DEPLOY_PYTHON" -m pip install --quiet --upgrade pip
  "$DEPLOY_PYTHON" -m pip install --quiet -e "${DEPLOY_ROOT}[server]"
  deploy_say "installed hil-mcp $("$DEPLOY_PYTHON" -c 'import hil_protocol; print(hil_protocol.__version__)')"
}

# Whether git tracks this file (it is in a work tree and was added): a secrets file must never be.
deploy_tracked_by_git() {
  command -v git >/dev/null 2>&1 || return 1
  git -C "$(dirname "$1")" ls-files --error-unmatch -- "$(basename "$1")" >/dev/null 2>&1
}

# What start needs, checked before anything is stopped or started.
deploy_preflight() {
  [ -x "$DEPLOY_PYTHON" ] || deploy_die "no Python at $DEPLOY_PYTHON: run '$DEPLOY_SCRIPT install' (or set VENV)"
  # The env file and .env hold secrets: one tracked by git is one `git push` away from being public.
  local secrets
  for secrets in ${DEPLOY_ENV_FILE:+"$DEPLOY_ENV_FILE"} .env; do
    if [ -f "$secrets" ] && deploy_tracked_by_git "$secrets"; then
      deploy_die "$secrets is tracked by git, and it holds secrets: untrack it (git rm --cached $secrets; it is in .gitignore), and change any secret that was ever committed"
    fi
  done
  # (the program also reads ./.env itself, so a value there counts too)
  if [ -n "${DEPLOY_REQUIRE:-}" ] && [ -z "${!DEPLOY_REQUIRE:-}" ] &&
    ! grep -Eiqs "^[[:space:]]*(export[[:space:]]+)?$DEPLOY_REQUIRE=[\"']?[^[:space:]\"'#]" .env; then
    deploy_die "$DEPLOY_REQUIRE is not set ($DEPLOY_REQUIRE_HINT); put it in ${DEPLOY_ENV_FILE:-$DEPLOY_ENV_DEFAULT} or the environment"
  fi
}

deploy_start() {
  local pid body
  if pid="$(deploy_pid)"; then
    deploy_say "already running (pid $pid)"
    if body="$(deploy_health 2>/dev/null)"; then printf '%s\n' "$body"; fi
    return 0
  fi
  rm -f "$PID_FILE"
  deploy_preflight
  if deploy_port_busy; then
    deploy_die "port $DEPLOY_PORT is already in use ($DEPLOY_PORT_VAR); is another instance running?"
  fi
  mkdir -p "$(dirname "$PID_FILE")" "$(dirname "$LOG_FILE")"
  local log_offset
  log_offset="$(stat -c %s "$LOG_FILE" 2>/dev/null || echo 0)"
  deploy_say "starting (python -m $DEPLOY_MODULE, port $DEPLOY_PORT, log $LOG_FILE)"
  PYTHONUNBUFFERED=1 nohup "$DEPLOY_PYTHON" -m "$DEPLOY_MODULE" </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$(deploy_proc_state "$pid")" = Z ]; then
      rm -f "$PID_FILE"
      deploy_tail_log 30
      deploy_die "exited during startup (see $LOG_FILE)"
    fi
    if body="$(deploy_health 2>/dev/null)"; then
      deploy_say "running (pid $pid)"
      printf '%s\n' "$body"
      deploy_startup_warnings "$log_offset"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      deploy_tail_log 30
      deploy_say "not healthy after ${START_TIMEOUT}s at $HEALTH_URL; stopping it" >&2
      deploy_stop >&2
      exit 1
    fi
    sleep 0.3
  done
}

# What the program warned about while starting (an open API, unguarded callbacks...): an operator reads this
# script's output, not the log, so repeat those lines here (already redacted: the program never logs secrets).
deploy_startup_warnings() {
  local line
  tail -c +"$(($1 + 1))" "$LOG_FILE" 2>/dev/null |
    grep -E '^[0-9-]+ [0-9:,.]+ (WARNING|ERROR|CRITICAL) |"level": ?"(WARNING|ERROR|CRITICAL)"' |
    sed -E 's/^[0-9-]+ [0-9:,.]+ //' |
    while IFS= read -r line; do
      deploy_say "$line" >&2
    done || true
}

deploy_proc_state() {
  if [ -r "/proc/$1/stat" ]; then
    # the state is the field after "(comm)"
    sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1
  fi
}

deploy_stop() {
  local pid
  if ! pid="$(deploy_pid)"; then
    rm -f "$PID_FILE"
    deploy_say "not running"
    return 0
  fi
  deploy_say "stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while deploy_is_ours "$pid" && [ "$(deploy_proc_state "$pid")" != Z ]; do
    if ((SECONDS >= deadline)); then
      deploy_say "still running after ${STOP_TIMEOUT}s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$PID_FILE"
  deploy_say "stopped"
}

# Exit status (LSB): 0 running and healthy, 1 running but not healthy, 3 not running.
deploy_status() {
  local pid body
  if ! pid="$(deploy_pid)"; then
    deploy_say "not running"
    return 3
  fi
  deploy_say "running (pid $pid)"
  if body="$(deploy_health 2>&1)"; then
    printf '%s\n' "$body"
    return 0
  fi
  deploy_say "not healthy at $HEALTH_URL: $body"
  return 1
}

deploy_usage() {
  cat <<EOF
usage: $DEPLOY_SCRIPT [install|start|stop|restart|status|logs]
  (no argument)  install if $VENV is missing, then start
  install        create the virtualenv (VENV, default $DEPLOY_ROOT/.venv, shared with ./hil) and
                 install the checkout into it (editable: after git pull, restart; install again for new dependencies)
  start          run python -m $DEPLOY_MODULE in the background, wait until $HEALTH_URL answers,
                 then repeat the warnings it logged while starting
  stop           SIGTERM, then SIGKILL after STOP_TIMEOUT (${STOP_TIMEOUT}s)
  restart        stop, then start
  status         whether it runs, and its /health answer
  logs           the last TAIL_LINES (100) lines of the log ($LOG_FILE), then follow it until Ctrl+C
Settings come from the environment and from the env file $DEPLOY_ENV_VAR (default $DEPLOY_ENV_DEFAULT).
Overrides: VENV (or HIL_VENV), PID_FILE (default $DEPLOY_PID_DEFAULT), LOG_FILE (default $DEPLOY_LOG_DEFAULT),
START_TIMEOUT, STOP_TIMEOUT, HEALTH_URL, TAIL_LINES (logs), PYTHON (used by install).
EOF
}

deploy_main() {
  deploy_service "$1"
  local cmd="${2:-}"
  deploy_setup
  case "$cmd" in
    "")
      [ -x "$DEPLOY_PYTHON" ] || deploy_install
      deploy_start
      ;;
    install) deploy_install ;;
    start) deploy_start ;;
    stop) deploy_stop ;;
    restart)
      deploy_preflight
      deploy_stop
      deploy_start
      ;;
    status) deploy_status ;;
    logs)
      mkdir -p "$(dirname "$LOG_FILE")"
      touch "$LOG_FILE"
      # On stderr, so `logs > file` keeps the log alone.
      deploy_say "following $LOG_FILE (last ${TAIL_LINES:-100} lines, then new ones as they come); Ctrl+C to stop" >&2
      exec tail -n "${TAIL_LINES:-100}" -F "$LOG_FILE"
      ;;
    -h | --help | help) deploy_usage ;;
    *)
      deploy_usage >&2
      exit 2
      ;;
  esac
}
