# The large-audience scenario of scripts/bench (`scripts/bench viewers`), sourced by it after
# its set-up: BIN, TOKEN, RUN, RUNS, PIDS, launch_pollcast and the services are its.
#
# Six production-shape pollcast processes (tansu, one Postgres database, Redis) in one
# consumer group. WebSocket viewers of one poll are spread over all six by several load
# generators (each holds its share of the sockets: a process may hold at most 20,000 open
# files here), each from its own loopback source address. Once every viewer has its
# snapshot, another load generator sends votes at a steady rate to all six. Then the
# viewers are told to stop; each load generator waits for the counts to settle and checks
# every one of its viewers' screens against the poll's final counts.
#
# Three phases, each on fresh processes:
#   ceiling BENCH_VIEWERS viewers of six bare broadcasters (bench/fanout_ceiling.rs): one
#           write of a ready frame per viewer every 2 s, on the same wall-clock ticks, and
#           nothing else; what the machine (the kernel's loopback TCP, the viewers' load
#           generators) allows at best. No votes: each tick is an update;
#   steady  BENCH_VIEWERS viewers, no fault;
#   kill    BENCH_VIEWERS_KILL viewers; BENCH_VIEWERS_KILL_AT s into the votes the sixth
#           process is killed with SIGKILL; its viewers come back on the others (backoff with
#           jitter, as the live page does) and its votes are retried on them.
# Why fewer viewers in the kill phase by default: five processes must then hold them all,
# and 100,000 over five is 20,000 each, the open-file limit itself.
#
# Loopback only, bounded: every wait has a deadline.
#
#   BENCH_VIEWERS=100000 BENCH_VIEWERS_KILL=90000 BENCH_VIEWERS_WATCHERS=6
#   BENCH_VIEWERS_RATE=1000 (votes/s)  BENCH_VIEWERS_SECONDS=30  BENCH_VIEWERS_KILL_AT=10
#   BENCH_VIEWERS_PHASES="ceiling steady kill"
#   BENCH_VIEWERS_ENV="POLLCAST__X=1 ..."  more settings for the pollcast processes (A/B runs)
#   BENCH_LOG_DIR=DIR             keep the processes' logs and the reports there (also after a failure)

. scripts/lib/cluster.sh

VIEW_AUDIENCE=${BENCH_VIEWERS:-100000}
VIEW_KILL_AUDIENCE=${BENCH_VIEWERS_KILL:-90000}
VIEW_WATCHERS=${BENCH_VIEWERS_WATCHERS:-6}
VIEW_RATE=${BENCH_VIEWERS_RATE:-1000}
VIEW_SECS=${BENCH_VIEWERS_SECONDS:-30}
VIEW_KILL_AT=${BENCH_VIEWERS_KILL_AT:-10}
VIEW_PHASES=${BENCH_VIEWERS_PHASES:-ceiling steady kill}
CLUSTER_PROCESSES=6
# Longest wait for every viewer to have its snapshot, and for the viewers' final reports.
VIEW_CONNECT_DEADLINE=600
VIEW_REPORT_DEADLINE=180

for v in "$VIEW_AUDIENCE" "$VIEW_KILL_AUDIENCE" "$VIEW_WATCHERS" "$VIEW_SECS" "$VIEW_KILL_AT"; do
  case $v in '' | *[!0-9]* | 0) fail "BENCH_VIEWERS*: '$v' is not a positive whole number" ;; esac
done
for p in $VIEW_PHASES; do
  case $p in ceiling | steady | kill) ;; *) fail "BENCH_VIEWERS_PHASES: unknown phase '$p' (ceiling steady kill)" ;; esac
done

# proc_cpu_ticks PID: user and kernel CPU of a process, in clock ticks, tab-separated.
proc_cpu_ticks() {
  awk '{ sub(/.*\) /, ""); print $12 "\t" $13 }' "/proc/$1/stat" 2>/dev/null || printf '0\t0\n'
}

# proc_rss_kb PID
proc_rss_kb() { ps -o rss= -p "$1" 2>/dev/null | tr -d ' ' || echo 0; }

# sample_servers FILE: a line per process: index, pid, RSS in KB, user and kernel CPU
# ticks, open files.
sample_servers() {
  local i pid
  : >"$1"
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    pid=${CLUSTER_PID[$i]}
    printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$pid" "$(proc_rss_kb "$pid")" "$(proc_cpu_ticks "$pid")" \
      "$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)" >>"$1"
  done
}

# sample_others FILE: a line per other process of the scenario that shares the machine with
# the servers: group (broker, viewers), pid, user and kernel CPU ticks. Why: the viewers'
# delay is the whole machine's, and the report splits it by who spent it.
sample_others() {
  local w
  : >"$1"
  if [ -n "${TANSU_PID:-}" ]; then
    printf 'broker\t%s\t%s\n' "$TANSU_PID" "$(proc_cpu_ticks "$TANSU_PID")" >>"$1"
  fi
  for w in $(seq 1 "$VIEW_WATCHERS"); do
    printf 'viewers\t%s\t%s\n' "${VIEW_WATCHER_PID[$w]}" "$(proc_cpu_ticks "${VIEW_WATCHER_PID[$w]}")" >>"$1"
  done
}

# viewers_phase NAME AUDIENCE KILL(yes|no): one run on a fresh cluster.
viewers_phase() {
  local name=$1 audience=$2 kill=$3 urls i w
  local poll per lg_pid lg_code=0 t_launch t_connected t_kill='' deadline
  local verify=(--verify --reconnect)
  OUT="$RUNS/viewers/$name"
  mkdir -p "$OUT"
  if [ "$name" = ceiling ]; then
    ceiling_up
    # Nothing to verify against, and nothing to come back to.
    verify=()
    poll=1
  else
    start_tansu
    production_env "viewers_$name"
    # shellcheck disable=SC2206 # split on purpose: NAME=VALUE words
    CLUSTER_ENV=("${PRODUCTION_ENV[@]}" ${BENCH_VIEWERS_ENV:-})
    cluster_up
    poll=$(curl -sf -X POST "http://127.0.0.1:${CLUSTER_PORT[1]}/polls" \
      -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
      -d '{"question":"viewers","options":["a","b","c","d"]}' |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') ||
      fail "creating the viewers' poll failed"
  fi
  urls=$CLUSTER_URLS
  sample_servers "$OUT/servers-empty.tsv"

  say "phase $name: $audience viewers of poll $poll over $CLUSTER_PROCESSES processes, from $VIEW_WATCHERS load generators"
  per=$(((audience + VIEW_WATCHERS - 1) / VIEW_WATCHERS))
  t_launch=$(now)
  for w in $(seq 1 "$VIEW_WATCHERS"); do
    # Each its own source address, and its own share of the open files.
    (ulimit -n "$(ulimit -Hn)" && exec "$BIN/pollcast-loadgen" votes --url "$urls" --poll-ids "$poll" \
      --connections 0 --subscribers "$per" --source-addrs "127.0.0.$((10 + w))" "${verify[@]}" \
      --duration 1800s --ready-file "$OUT/w$w.ready" --json --quiet >"$OUT/w$w.json" 2>"$OUT/w$w.log") &
    VIEW_WATCHER_PID[$w]=$!
    PIDS+=("$!")
  done
  deadline=$((SECONDS + VIEW_CONNECT_DEADLINE))
  for w in $(seq 1 "$VIEW_WATCHERS"); do
    while [ ! -f "$OUT/w$w.ready" ]; do
      kill -0 "${VIEW_WATCHER_PID[$w]}" 2>/dev/null || fail "viewer load generator $w exited: $(tail -5 "$OUT/w$w.log")"
      [ "$SECONDS" -lt "$deadline" ] || fail "viewers not connected within ${VIEW_CONNECT_DEADLINE} s"
      sleep 0.2
    done
  done
  t_connected=$(now)
  say "phase $name: connected in $(python3 -c "print(round($t_connected - $t_launch, 1))") s; votes at $VIEW_RATE/s for ${VIEW_SECS} s"
  # Why a pause: the last handshakes' buffers are freed and the heap settles before RSS is read.
  sleep 3
  sample_servers "$OUT/servers-connected.tsv"
  sample_others "$OUT/others-connected.tsv"
  cp /proc/loadavg "$OUT/loadavg-before"
  head -1 /proc/stat >"$OUT/stat-before"

  if [ "$name" = ceiling ]; then
    # The broadcasters send on their own; the same window as the votes of the other phases.
    sleep "$VIEW_SECS" &
  else
    "$BIN/pollcast-loadgen" votes --url "$urls" --poll-ids "$poll" --token "$TOKEN" --connections 12 \
      --rate "$VIEW_RATE" --duration "${VIEW_SECS}s" --retries 8 --verify --json --quiet \
      >"$OUT/votes.json" 2>"$OUT/votes.log" &
  fi
  lg_pid=$!
  PIDS+=("$lg_pid")
  if [ "$kill" = yes ]; then
    sleep "$VIEW_KILL_AT"
    t_kill=$(now)
    say "phase $name: SIGKILL to p$CLUSTER_PROCESSES (pid ${CLUSTER_PID[$CLUSTER_PROCESSES]})"
    kill -KILL "${CLUSTER_PID[$CLUSTER_PROCESSES]}"
  fi
  wait "$lg_pid" || lg_code=$?
  [ "$lg_code" -le 1 ] || fail "the vote load generator failed ($lg_code): $(tail -5 "$OUT/votes.log")"
  sample_servers "$OUT/servers-voted.tsv"
  sample_others "$OUT/others-voted.tsv"
  head -1 /proc/stat >"$OUT/stat-after"
  cp /proc/loadavg "$OUT/loadavg-after"

  for w in $(seq 1 "$VIEW_WATCHERS"); do kill -TERM "${VIEW_WATCHER_PID[$w]}" 2>/dev/null || true; done
  for w in $(seq 1 "$VIEW_WATCHERS"); do
    # Bounded: each settles the counts (a minute at most) and then reports.
    wait_bounded "${VIEW_WATCHER_PID[$w]}" "$VIEW_REPORT_DEADLINE"
    lg_code=$WAITED_CODE
    [ "$lg_code" -le 1 ] || fail "viewer load generator $w failed ($lg_code): $(tail -5 "$OUT/w$w.log")"
  done
  "$BIN/pollcast-loadgen" merge "$OUT"/w*.json --json >"$OUT/viewers.json"

  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    kill -TERM "${CLUSTER_PID[$i]}" 2>/dev/null || true
    wait "${CLUSTER_PID[$i]}" 2>/dev/null || true
  done
  [ "$name" = ceiling ] || stop_tansu
  printf '%s\n%s\n%s\n%s\n%s\n' "$audience" "$kill" "$t_launch" "$t_connected" "$t_kill" >"$OUT/phase"
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do echo "127.0.0.1:${CLUSTER_PORT[$i]}"; done >"$OUT/hosts"
}

# ceiling_up: starts CLUSTER_PROCESSES bare broadcasters, as cluster_up does pollcast.
ceiling_up() {
  local i
  CLUSTER_PORT=() CLUSTER_PID=() CLUSTER_URLS=''
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    CLUSTER_PORT[$i]=$(free_port)
    CLUSTER_URLS+="${CLUSTER_URLS:+,}http://127.0.0.1:${CLUSTER_PORT[$i]}"
    (ulimit -n "$(ulimit -Hn)" && exec "$BIN/examples/fanout_ceiling" "127.0.0.1:${CLUSTER_PORT[$i]}" \
      >>"$OUT/p$i.log" 2>&1) &
    CLUSTER_PID[$i]=$!
    PIDS+=("$!")
  done
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do wait_port "${CLUSTER_PORT[$i]}" "fan-out ceiling p$i"; done
}

run_viewers() {
  local phase
  for phase in $VIEW_PHASES; do
    case $phase in
      ceiling) viewers_phase ceiling "$VIEW_AUDIENCE" no ;;
      steady) viewers_phase steady "$VIEW_AUDIENCE" no ;;
      kill) viewers_phase kill "$VIEW_KILL_AUDIENCE" yes ;;
    esac
  done
  mkdir -p bench
  python3 scripts/lib/viewers_report.py "$RUNS/viewers" "$VIEW_RATE" "$VIEW_SECS" "$VIEW_KILL_AT" \
    "$VIEW_WATCHERS" $VIEW_PHASES
}
