# Several production-shape pollcast processes in one consumer group, for the scenarios of
# scripts/bench that run a cluster (rolling.sh, viewers.sh); sourced after the bench's
# set-up (launch_pollcast, OUT). The scenario sets CLUSTER_PROCESSES and CLUSTER_ENV (the
# processes' shared config); CLUSTER_PORT[I] and CLUSTER_PID[I] are each process's.

# Longest wait for a started process to be ready, and for the group to settle.
CLUSTER_READY_DEADLINE=${CLUSTER_READY_DEADLINE:-120}
# The partitions of the vote topic (pollcast creates six).
CLUSTER_PARTITIONS=6

now() { date +%s.%N; }

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

