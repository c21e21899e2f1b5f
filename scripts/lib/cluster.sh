# Production-shape pollcast processes, alone or several in one consumer group, for the
# scenarios of scripts/bench that run them (rolling.sh, viewers.sh, catchup.sh); sourced
# after the bench's set-up (launch_pollcast, OUT). A cluster's scenario sets
# CLUSTER_PROCESSES and CLUSTER_ENV (the processes' shared config); CLUSTER_PORT[I] and
# CLUSTER_PID[I] are each process's, CLUSTER_URLS all of their URLs.

# Longest wait for a started process to be ready, and for the group to settle.
CLUSTER_READY_DEADLINE=${CLUSTER_READY_DEADLINE:-120}
# The partitions of the vote topic (pollcast creates six).
CLUSTER_PARTITIONS=6

now() { date +%s.%N; }

# production_env NAME: in PRODUCTION_ENV, the settings of the production shape (the tansu
# broker started by start_tansu, Postgres, Redis) on a new database of its own, with its
# own Redis key prefix and consumer group.
production_env() {
  local name=$1 db="pollcast_bench_${RUN}_$1"
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE $db"
  PRODUCTION_ENV=(
    POLLCAST__STORE__URL="postgres://postgres@$PG_HOST:$PG_PORT/$db"
    POLLCAST__DEDUP__KIND=redis POLLCAST__DEDUP__REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT"
    POLLCAST__DEDUP__KEY_PREFIX="bench:$RUN:$name:"
    POLLCAST__LOG__KIND=kafka POLLCAST__LOG__KAFKA__BROKERS="127.0.0.1:$KAFKA_PORT"
    POLLCAST__LOG__KAFKA__GROUP_ID="bench-$RUN-$name"
  )
}

# cluster_up: starts CLUSTER_PROCESSES processes with CLUSTER_ENV, and waits until each is
# ready and the group has settled, so that the load starts on a cluster at rest.
cluster_up() {
  local i
  CLUSTER_PORT=() CLUSTER_PID=() CLUSTER_URLS=''
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    CLUSTER_PORT[$i]=$(free_port)
    CLUSTER_URLS+="${CLUSTER_URLS:+,}http://127.0.0.1:${CLUSTER_PORT[$i]}"
    cluster_start "$i"
  done
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do cluster_ready "$i"; done
  cluster_wait_split
}

# wait_bounded PID SECONDS: waits for PID (a job of this shell) to end, killing it with
# SIGKILL once SECONDS have passed; its exit code in WAITED_CODE. Why not a watchdog
# subshell killed once PID is done: a subshell signalled just after it was forked can still
# run this shell's TERM trap, and then its EXIT trap, whose cleanup removes the run's files.
# Why `jobs -rp` and not `kill -0`: an ended job not yet waited for still answers kill -0.
wait_bounded() {
  local pid=$1 deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ] && jobs -rp | grep -qx "$pid"; do sleep 0.01; done
  kill -KILL "$pid" 2>/dev/null || true
  WAITED_CODE=0
  wait "$pid" || WAITED_CODE=$?
}

# cluster_start I: starts process I (again) on its port, with the shared config; CLUSTER_PID[I].
cluster_start() {
  local i=$1
  launch_pollcast "p$i" "${CLUSTER_PORT[$i]}" "${CLUSTER_ENV[@]}"
  CLUSTER_PID[$i]=$SERVER_PID
}

# cluster_ready I: waits until process I's /readyz answers 200, and keeps that answer.
cluster_ready() {
  local i=$1 deadline=$((SECONDS + CLUSTER_READY_DEADLINE))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -sf "http://127.0.0.1:${CLUSTER_PORT[$i]}/readyz" >"$OUT/ready-p$i.json" 2>/dev/null; then
      return 0
    fi
    kill -0 "${CLUSTER_PID[$i]}" 2>/dev/null || fail "pollcast p$i exited at start: $(tail -5 "$OUT/p$i.log")"
    sleep 0.05
  done
  fail "pollcast p$i was not ready within ${CLUSTER_READY_DEADLINE} s: $(tail -5 "$OUT/p$i.log")"
}

# The partitions process I lists on /readyz (a JSON array), or nothing.
cluster_partitions() {
  curl -sf "http://127.0.0.1:${CLUSTER_PORT[$1]}/readyz" 2>/dev/null |
    python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("partitions") or []))' 2>/dev/null || true
}

# Waits until every process owns some partitions, and together all of them: the group has
# settled, so the load starts on a cluster at rest.
cluster_wait_split() {
  local deadline=$((SECONDS + CLUSTER_READY_DEADLINE)) owned i p
  while [ "$SECONDS" -lt "$deadline" ]; do
    owned=()
    for i in $(seq 1 "$CLUSTER_PROCESSES"); do
      p=$(cluster_partitions "$i")
      [ -n "$p" ] && [ "$p" != "[]" ] || break
      owned+=("$p")
    done
    if [ "${#owned[@]}" -eq "$CLUSTER_PROCESSES" ] &&
      python3 -c 'import json,sys; sys.exit(0 if sum(len(json.loads(a)) for a in sys.argv[2:]) == int(sys.argv[1]) else 1)' "$CLUSTER_PARTITIONS" "${owned[@]}"; then
      say "the group has settled: partitions ${owned[*]}"
      return 0
    fi
    sleep 0.2
  done
  fail "the $CLUSTER_PROCESSES processes did not share the partitions within ${CLUSTER_READY_DEADLINE} s"
}

