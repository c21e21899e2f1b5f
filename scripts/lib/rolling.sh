# The rolling-restart scenario of scripts/bench (`scripts/bench rolling`), sourced by it after
# its set-up: BIN, TOKEN, RUN, RUNS, PIDS, launch_pollcast and the services are its.
#
# Three production-shape pollcast processes (tansu, one Postgres database, Redis) in one
# consumer group, with the shipped consumer settings (no session or heartbeat override),
# take votes on all three URLs and serve subscribers on every poll. While the load runs,
# each process in turn is stopped with SIGTERM, waited for, replaced by one with the same
# config, and waited for until its /readyz answers 200; a pause, then the next. The load
# generator retries a vote answered 5xx or left unanswered with the same voteId on the next
# URL (`--retries`), and its subscribers come back on the next URL when theirs goes away
# (`--reconnect`), as the live page does. Then it verifies the counts poll by poll.
#
# Loopback only, bounded: the load lasts BENCH_ROLLING_SECONDS, each wait has a deadline.
#
#   BENCH_ROLLING_SECONDS=60      how long the load lasts (the three steps must fit in it)
#   BENCH_ROLLING_LEAD=10         seconds of load before the first SIGTERM
#   BENCH_ROLLING_PAUSE=5         seconds between a replacement's ready and the next SIGTERM
#   BENCH_ROLLING_POLLS=12  BENCH_ROLLING_SUBSCRIBERS=300  BENCH_ROLLING_CONNECTIONS=32
#   BENCH_ROLLING_RETRIES=8       most retries of one vote
#   BENCH_LOG_DIR=DIR             keep the processes' logs and the reports there (also after a failure)

. scripts/lib/cluster.sh

ROLL_SECS=${BENCH_ROLLING_SECONDS:-60}
ROLL_LEAD=${BENCH_ROLLING_LEAD:-10}
ROLL_PAUSE=${BENCH_ROLLING_PAUSE:-5}
ROLL_POLLS=${BENCH_ROLLING_POLLS:-12}
ROLL_SUBSCRIBERS=${BENCH_ROLLING_SUBSCRIBERS:-300}
ROLL_CONNECTIONS=${BENCH_ROLLING_CONNECTIONS:-32}
ROLL_RETRIES=${BENCH_ROLLING_RETRIES:-8}
CLUSTER_PROCESSES=3
# Longest wait for a stopped process to exit.
ROLL_EXIT_DEADLINE=60

# roll_step I: SIGTERM to process I, wait for its exit, start its replacement, wait until
# ready; appends the step's times to steps.tsv.
roll_step() {
  local i=$1 pid=${CLUSTER_PID[$1]} t_term t_exit t_start t_ready code
  say "step $i: SIGTERM to p$i (pid $pid)"
  t_term=$(now)
  kill -TERM "$pid"
  # Bounded: a process still running after the deadline is killed (and reported by its code).
  wait_bounded "$pid" "$ROLL_EXIT_DEADLINE"
  code=$WAITED_CODE
  t_exit=$(now)
  t_start=$(now)
  cluster_start "$i"
  cluster_ready "$i"
  t_ready=$(now)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$t_term" "$t_exit" "$code" "$t_start" "$t_ready" \
    "$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("partitions")))' "$OUT/ready-p$i.json")" \
    >>"$OUT/steps.tsv"
  say "step $i: exited $code, replacement ready; pausing ${ROLL_PAUSE} s"
  sleep "$ROLL_PAUSE"
}

run_rolling() {
  OUT="$RUNS/rolling"
  mkdir -p "$OUT"
  : >"$OUT/steps.tsv"
  start_tansu
  local urls i lg_pid lg_code=0 covered=yes
  # The production shape, as shipped: no consumer properties.
  production_env rolling
  CLUSTER_ENV=("${PRODUCTION_ENV[@]}" RUST_LOG="warn,pollcast=info,pollcast_actors=info")
  cluster_up
  urls=$CLUSTER_URLS

  say "scenario rolling: ${ROLL_SECS} s of load on $urls, restarts from ${ROLL_LEAD} s"
  # What else kept the machine busy: these figures are times, and the cores are shared.
  cp /proc/loadavg "$OUT/loadavg-before"
  "$BIN/pollcast-loadgen" votes --url "$urls" --token "$TOKEN" --json --quiet \
    --duration "${ROLL_SECS}s" --connections "$ROLL_CONNECTIONS" --polls "$ROLL_POLLS" \
    --subscribers "$ROLL_SUBSCRIBERS" --watch all --reconnect --retries "$ROLL_RETRIES" --verify \
    >"$OUT/loadgen.json" 2>"$OUT/loadgen.log" &
  lg_pid=$!
  PIDS+=("$lg_pid")
  sleep "$ROLL_LEAD"
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    kill -0 "$lg_pid" 2>/dev/null || covered=no
    roll_step "$i"
  done
  kill -0 "$lg_pid" 2>/dev/null || covered=no
  cp /proc/loadavg "$OUT/loadavg-after"
  [ "$covered" = yes ] || say "the load ended before the last step was over: raise BENCH_ROLLING_SECONDS"
  # The load generator ends by itself (its duration, then verification: at most a minute).
  wait "$lg_pid" || lg_code=$?
  [ "$lg_code" -le 1 ] || fail "the load generator failed ($lg_code): $(tail -5 "$OUT/loadgen.log")"
  for i in $(seq 1 "$CLUSTER_PROCESSES"); do
    kill -TERM "${CLUSTER_PID[$i]}" 2>/dev/null || true
    wait "${CLUSTER_PID[$i]}" 2>/dev/null || true
  done
  stop_tansu

  mkdir -p bench
  local met=0
  python3 - "$OUT" "$covered" "$ROLL_SECS" "$ROLL_LEAD" "$ROLL_PAUSE" "$ROLL_POLLS" "$ROLL_SUBSCRIBERS" \
    "$ROLL_CONNECTIONS" "$ROLL_RETRIES" <<'PY' || met=$?
import json, os, platform, sys, time
out, covered = sys.argv[1], sys.argv[2] == "yes"
secs, lead, pause, polls, subscribers, connections, retries = map(int, sys.argv[3:10])
report = json.load(open(os.path.join(out, "loadgen.json")))
start = report["started_unix_ms"] / 1000
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    i, term, exited, code, started, ready, partitions = line.rstrip("\n").split("\t")
    term, exited, started, ready = map(float, (term, exited, started, ready))
    steps.append({
        "process": f"p{i}",
        "sigterm_at_s": round(term - start, 2),
        "sigterm_to_exit_s": round(exited - term, 2),
        "exit_code": int(code),
        "start_to_ready_s": round(ready - started, 2),
        "partitions_at_ready": json.loads(partitions),
    })
r, v, f = report["retry"], report["verification"], report["fanout"]
stall = f.get("stall") or {}
refused = {k: n for k, n in report["errors"].items() if k.isdigit() and int(k) < 500}
summary = {
    "votes_accepted": report["accepted"],
    "votes_per_sec": round(report["accepted_per_sec"]),
    "first_attempt_5xx": r["first_5xx"],
    "first_attempt_unanswered": r["first_errors"],
    "first_attempt_not_sent": r.get("first_not_sent", 0),
    "first_attempt_unreachable": r["first_unreachable"],
    "retries": r["retries"],
    "failed_attempts": r["failures"],
    "left_after_retries": r["unresolved"],
    "refused_4xx": refused,
    "lost": v["lost"],
    "doubled": v["doubled"],
    "counted_equals_accepted": v["exact"],
    "settle_ms": v["settle_ms"],
    "longest_stall_s": round(stall.get("longest_ms", 0) / 1000, 2),
    "longest_stall_poll": stall.get("poll"),
    "longest_stall_ended_at_s": stall.get("ended_at_s"),
    "median_poll_longest_stall_s": round(stall.get("median_ms", 0) / 1000, 2),
    "subscribers": f["subscribers"],
    "subscribers_connected": f["connected"],
    "subscriber_disconnects": f["disconnects"],
    "subscribers_reconnected": f["reconnects"],
    "reconnect_p99_ms": (f.get("reconnect_delay") or {}).get("p99_ms"),
    "subscribers_live_at_end": f.get("live_at_end"),
    "counts_went_backwards": f["backwards"],
    "missed_updates": f["missed_updates"],
    "vote_p99_ms": report["latency"]["p99_ms"],
    "vote_max_ms": report["latency"]["max_ms"],
    "load_covered_all_steps": covered,
    "machine_idle": report["cpu"]["machine_idle"],
    "loadavg_1m_before_after": [float(open(os.path.join(out, f)).read().split()[0])
                                for f in ("loadavg-before", "loadavg-after")],
}
met = (summary["left_after_retries"] == 0 and summary["lost"] == 0 and summary["doubled"] == 0
       and summary["counts_went_backwards"] == 0 and covered)
result = {
    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": f"{os.cpu_count()} cores, {platform.machine()}",
    "command": "scripts/bench rolling",
    "settings": {"processes": 3, "seconds": secs, "lead_s": lead, "pause_s": pause, "polls": polls,
                 "subscribers": subscribers, "connections": connections, "retries": retries,
                 "consumer_properties": "shipped (none set)"},
    "target_met": met,
    "summary": summary,
    "steps": steps,
    "report": report,
}
json.dump(result, open("bench/results-rolling.json", "w"), indent=2)

print(f"rolling restart: 3 processes, {polls} polls, {subscribers} subscribers, {connections} connections, "
      f"{secs} s of load, retries up to {retries}")
fmt = "{:<6} {:<8} {:>12} {:>14} {:>10} {:>14}  {}"
print(fmt.format("step", "process", "SIGTERM at", "SIGTERM→exit", "exit code", "start→ready", "partitions at ready"))
for n, s in enumerate(steps, 1):
    print(fmt.format(n, s["process"], f"{s['sigterm_at_s']:.1f} s", f"{s['sigterm_to_exit_s']:.2f} s", s["exit_code"],
                     f"{s['start_to_ready_s']:.2f} s", s["partitions_at_ready"]))
rows = [
    ("votes accepted", f"{summary['votes_accepted']} ({summary['votes_per_sec']}/s)"),
    ("5xx on first attempt", summary["first_attempt_5xx"]),
    ("first attempts unanswered", summary["first_attempt_unanswered"]),
    ("first attempts not sent", f"{summary['first_attempt_not_sent']} (the server had closed the connection)"),
    ("retries", f"{summary['retries']} (failed attempts {summary['failed_attempts']})"),
    ("5xx/errors left after retries", summary["left_after_retries"]),
    ("refused 4xx", summary["refused_4xx"] or "none"),
    ("lost / doubled", f"{summary['lost']} / {summary['doubled']}"),
    ("counted == accepted", summary["counted_equals_accepted"]),
    ("longest stall", f"{summary['longest_stall_s']} s (poll {summary['longest_stall_poll']}, ended "
                      f"{summary['longest_stall_ended_at_s']} s into the load; median poll "
                      f"{summary['median_poll_longest_stall_s']} s)"),
    ("subscribers reconnected", f"{summary['subscribers_reconnected']} of {summary['subscriber_disconnects']} "
                                f"disconnects (p99 {summary['reconnect_p99_ms']} ms); "
                                f"{summary['subscribers_live_at_end']}/{summary['subscribers']} live at the end"),
    ("counts went backwards", summary["counts_went_backwards"]),
    ("vote latency p99 / max", f"{summary['vote_p99_ms']} / {summary['vote_max_ms']} ms"),
    ("machine", f"idle {'n/a' if summary['machine_idle'] is None else round(summary['machine_idle'] * 100, 1)} % during the load; load average "
                f"{summary['loadavg_1m_before_after'][0]} before, {summary['loadavg_1m_before_after'][1]} after"),
]
for name, value in rows:
    print(f"{name:<31} {value}")
print("target (no 5xx a retry does not fix, none lost or doubled): " + ("met" if met else "NOT MET"))
sys.exit(0 if met else 1)
PY
  say "written bench/results-rolling.json"
  # Like a mismatch in the other scenarios, a missed target fails the run.
  [ "$met" -eq 0 ] || exit 1
}
