"""What the dependencies were asked to do during a scenario, per accepted vote.

    python3 scripts/lib/work.py snapshot FILE --metrics URL [--redis HOST:PORT] [--postgres DSN DB]
    python3 scripts/lib/work.py per-vote BEFORE AFTER REPORT   # adds "work" to REPORT (JSON)

A snapshot reads pollcast's own counters (/metrics), Redis's (INFO stats) and Postgres's
(pg_stat_database of the scenario's database, pg_stat_wal of the cluster, which is otherwise
idle during a bench). `per-vote` divides the differences by the votes the load generator
saw accepted. Used by scripts/bench; see docs/BENCHMARKS.md, "What one vote costs".
"""
import json
import re
import subprocess
import sys
import urllib.request

METRICS = {
    "log_syncs": ("pollcast_log_syncs_total", None),
    "kafka_produce_requests": ("pollcast_kafka_produce_requests_total", 'producer="votes"'),
    "kafka_produced_records": ("pollcast_kafka_produced_records_total", 'producer="votes"'),
    "kafka_counts_requests": ("pollcast_kafka_produce_requests_total", 'producer="counts"'),
    "flushes": ("pollcast_flush_batch_size_count", None),
}
REDIS = ["total_commands_processed", "total_reads_processed", "total_writes_processed"]
PG_DB = ["xact_commit", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted"]
PG_WAL = ["wal_records", "wal_bytes", "wal_sync"]


def metric(text, name, label):
    """The sum of a metric's samples (those with `label`, if given); None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        if label and label not in (m.group(2) or ""):
            continue
        total, seen = total + float(m.group(3)), True
    return total if seen else None


def snapshot(args):
    out, i = {}, 0
    while i < len(args):
        flag = args[i]
        if flag == "--metrics":
            text = urllib.request.urlopen(args[i + 1] + "/metrics", timeout=10).read().decode()
            for key, (name, label) in METRICS.items():
                out[key] = metric(text, name, label)
            i += 2
        elif flag == "--redis":
            host, port = args[i + 1].rsplit(":", 1)
            info = subprocess.run(["redis-cli", "-h", host, "-p", port, "INFO", "stats"],
                                  check=True, capture_output=True, text=True).stdout
            fields = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
            for key in REDIS:
                out["redis_" + key] = float(fields[key])
            i += 2
        elif flag == "--postgres":
            dsn, db = args[i + 1], args[i + 2]
            query = (f"SELECT {', '.join(PG_DB)} FROM pg_stat_database WHERE datname = '{db}';"
                     f"SELECT {', '.join(PG_WAL)} FROM pg_stat_wal;")
            rows = subprocess.run(["psql", dsn, "-AtF", " ", "-c", query],
                                  check=True, capture_output=True, text=True).stdout.split()
            for key, value in zip(["pg_" + k for k in PG_DB + PG_WAL], rows):
                out[key] = float(value)
            i += 3
        else:
            sys.exit(f"work.py: unknown option {flag}")
    return out


def per_vote(before, after, votes):
    work = {}
    for key, value in after.items():
        if value is None or before.get(key) is None or not votes:
            continue
        work[key] = round((value - before[key]) / votes, 4)
    if work.get("kafka_produce_requests"):
        work["kafka_records_per_request"] = round(
            work["kafka_produced_records"] / work["kafka_produce_requests"], 1)
    if work.get("redis_total_reads_processed"):
        work["redis_commands_per_read"] = round(
            work["redis_total_commands_processed"] / work["redis_total_reads_processed"], 2)
    return work


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "snapshot":
        json.dump(snapshot(sys.argv[3:]), open(sys.argv[2], "w"))
    elif command == "per-vote":
        before, after = (json.load(open(p)) for p in sys.argv[2:4])
        report = json.load(open(sys.argv[4]))
        report["work"] = per_vote(before, after, report["accepted"])
        json.dump(report, open(sys.argv[4], "w"))
    else:
        sys.exit(__doc__)
