# The catch-up scenario of scripts/bench (`scripts/bench catchup`), sourced by it after its
# set-up: BIN, TOKEN, RUN, RUNS, PIDS, launch_pollcast and the services are its.
#
# How a backlog is made, without any test-only switch: one pollcast runs with flushes held
# back (`aggregator.flush_interval_ms` 60000, `flush_max_votes` 1000000, a read window
# larger than the backlog), takes
# BENCH_CATCHUP_VOTES votes as fast as it answers (the rate at which one process accepts
# votes), and is killed with SIGKILL before any flush: every vote is acknowledged and waits
# in the log, none is counted. Then it is started again with the shipped settings, and
# counts them. Meanwhile viewers watch every poll and check that no count goes back, and
# the server's RSS is sampled (the read window, `aggregator.max_unflushed_votes`, bounds it).
#
# Variants, each `SHAPE:POLLS[:VOTES]` (BENCH_CATCHUP_VARIANTS): the embedded log or Kafka
# (tansu, with Postgres and Redis), the votes on one hot poll or spread over many. Why
# fewer votes for Kafka over many polls by default: the fill must end before the held-back
# flush interval (60 s) does, and one process takes about 10,000 votes a second there.
#
#   BENCH_CATCHUP_VOTES=1000000  BENCH_CATCHUP_CONNECTIONS=256
#   BENCH_CATCHUP_VARIANTS="embedded:1 embedded:100 production:1 production:100:500000"
#   BENCH_CATCHUP_VIEWERS=200    viewers, spread over the polls
#   BENCH_LOG_DIR=DIR            keep the processes' logs and the reports there (also after a failure)

. scripts/lib/cluster.sh

CATCH_VOTES=${BENCH_CATCHUP_VOTES:-1000000}
CATCH_CONNECTIONS=${BENCH_CATCHUP_CONNECTIONS:-256}
CATCH_VARIANTS=${BENCH_CATCHUP_VARIANTS:-embedded:1 embedded:100 production:1 production:100:500000}
CATCH_VIEWERS=${BENCH_CATCHUP_VIEWERS:-200}
# Longest wait for the backlog to be counted.
CATCH_DEADLINE=900

for v in "$CATCH_VOTES" "$CATCH_CONNECTIONS" "$CATCH_VIEWERS"; do
  case $v in '' | *[!0-9]* | 0) fail "BENCH_CATCHUP_*: '$v' is not a positive whole number" ;; esac
done
for v in $CATCH_VARIANTS; do
  case $v in
    embedded:[1-9]* | production:[1-9]*) ;;
    *) fail "BENCH_CATCHUP_VARIANTS: '$v' is not SHAPE:POLLS[:VOTES] (embedded or production)" ;;
  esac
done

# catchup_variant SHAPE POLLS VOTES
catchup_variant() {
  local shape=$1 polls=$2 votes=$3 name="catchup-$1-$2" port ids env=() watch=() fill_code=0 w_pid sampler
  local t0 t_ready
  OUT="$RUNS/catchup/$name"
  mkdir -p "$OUT"
  if [ "$shape" = production ]; then
    start_tansu
    production_env "catchup_$polls"
    env=("${PRODUCTION_ENV[@]}")
    watch=(redis="$(redis_pid)" tansu="$TANSU_PID" postgres="$(postmaster_pid)+")
  fi
  port=$(free_port)
  say "catch-up $name: filling the log with $votes votes, flushes held back"
  # Why a read window larger than the fill: a full window flushes its polls at once.
  start_pollcast "$name" "$port" "${env[@]}" POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS=60000 \
    POLLCAST__AGGREGATOR__FLUSH_MAX_VOTES=1000000 POLLCAST__AGGREGATOR__MAX_UNFLUSHED_VOTES=$((votes + 1))
  ids=$(python3 scripts/lib/catchup.py create "http://127.0.0.1:$port" "$TOKEN" "$polls")
  "$BIN/pollcast-loadgen" votes --url "http://127.0.0.1:$port" --poll-ids "$ids" --count "$votes" \
    --connections "$CATCH_CONNECTIONS" --json --quiet >"$OUT/fill.json" 2>"$OUT/fill.log" || fill_code=$?
  [ "$fill_code" -eq 0 ] || fail "filling the log failed ($fill_code): $(tail -5 "$OUT/fill.log")"
  python3 scripts/lib/catchup.py totals "http://127.0.0.1:$port" "$ids" >"$OUT/counted-before"
  kill -KILL "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true

  say "catch-up $name: restarted with the shipped settings"
  t0=$(date +%s.%N)
  launch_pollcast "$name" "$port" "${env[@]}"
  python3 scripts/lib/catchup.py sample-rss "$SERVER_PID" "$OUT/rss.tsv" &
  sampler=$!
  PIDS+=("$sampler")
  wait_port "$port" "pollcast ($name)"
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.05
  done
  t_ready=$(date +%s.%N)
  python3 scripts/lib/catchup.py threads "$SERVER_PID" >"$OUT/threads-ready.json"
  python3 scripts/lib/catchup.py procs "${watch[@]}" >"$OUT/deps-ready.json"
  "$BIN/pollcast-loadgen" votes --url "http://127.0.0.1:$port" --poll-ids "$ids" --connections 0 \
    --subscribers "$CATCH_VIEWERS" --watch all --verify --duration 1800s --json --quiet \
    >"$OUT/viewers.json" 2>"$OUT/viewers.log" &
  w_pid=$!
  PIDS+=("$w_pid")
  python3 scripts/lib/catchup.py wait "http://127.0.0.1:$port" "$ids" "$(cat "$OUT/counted-before")" \
    "$OUT/fill.json" "$CATCH_DEADLINE" "$t0" >"$OUT/progress.json"
  python3 scripts/lib/catchup.py threads "$SERVER_PID" >"$OUT/threads-done.json"
  # Kept with the logs: how many flushes, and how large, counted the backlog.
  curl -sf "http://127.0.0.1:$port/metrics" >"$OUT/metrics-done.txt" || true
  python3 scripts/lib/catchup.py procs "${watch[@]}" >"$OUT/deps-done.json"
  kill "$sampler" 2>/dev/null || true
  kill -TERM "$w_pid" 2>/dev/null || true
  wait "$w_pid" || true
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  [ "$shape" = production ] && stop_tansu
  printf '%s\n%s\n%s\n%s\n' "$shape" "$polls" "$t0" "$t_ready" >"$OUT/variant"
}

run_catchup() {
  local v
  local shape polls votes
  for v in $CATCH_VARIANTS; do
    IFS=: read -r shape polls votes <<<"$v"
    catchup_variant "$shape" "$polls" "${votes:-$CATCH_VOTES}"
  done
  mkdir -p bench
  python3 scripts/lib/catchup.py report "$RUNS/catchup"
}
