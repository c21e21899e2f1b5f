"""Helpers of `scripts/bench catchup` (scripts/lib/catchup.sh), and its report.

  catchup.py create URL TOKEN N          creates N polls; prints their ids, comma-separated
  catchup.py totals URL IDS              prints the sum of the polls' totalVotes
  catchup.py sample-rss PID FILE         appends "unix_time rss_kb" every 0.2 s while PID lives
  catchup.py threads PID                 JSON: CPU ticks by thread name (summed over threads)
  catchup.py procs NAME=PID[+] ...       JSON: CPU ticks by name (PID+: with its children)
  catchup.py wait URL IDS BEFORE FILL_JSON DEADLINE_S T0
                                         polls the totals until the backlog is counted; JSON
  catchup.py report RUNS_DIR             writes bench/results-catchup.json, prints the table
"""

import json
import os
import platform
import sys
import time
import urllib.request

HZ = os.sysconf("SC_CLK_TCK")
# The target: a backlog is counted at least this many times as fast as one process
# accepts votes.
TARGET_RATIO = 5


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def create(url, token, n):
    ids = []
    for i in range(int(n)):
        body = json.dumps({"question": f"catch-up {i}", "options": ["a", "b", "c", "d"]}).encode()
        req = urllib.request.Request(f"{url}/polls", data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            ids.append(json.load(resp)["id"])
    print(",".join(map(str, ids)))


def totals(url, ids):
    return sum(get(f"{url}/polls/{p}")["totalVotes"] for p in ids.split(","))


def sample_rss(pid, path):
    with open(path, "a") as out:
        while True:
            try:
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                return
            rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            out.write(f"{time.time():.2f} {rss}\n")
            out.flush()
            time.sleep(0.2)


def stat_ticks(path):
    text = open(path).read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def threads(pid):
    by_name = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            ticks = stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        by_name[name] = by_name.get(name, 0) + ticks
    print(json.dumps(by_name))


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = open(f"/proc/{entry}/stat").read()
                ppid = int(text[text.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def procs(specs):
    ticks = {}
    for spec in specs:
        name, pid = spec.split("=", 1)
        with_children = pid.endswith("+")
        pids = [int(pid.rstrip("+"))]
        if with_children:
            pids += children(pids[0])
        total = 0
        for p in pids:
            try:
                # A process's own ticks; its exited children's are in cutime, not counted.
                total += stat_ticks(f"/proc/{p}/stat")
            except OSError:
                pass
        ticks[name] = total
    print(json.dumps(ticks))


def counted_since_start(url):
    """The process's `pollcast_votes_counted_total`: ballots it inserted since it started.
    Why not the polls' totals: reading many polls takes longer than the counting moves,
    and each is read at a different moment."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("pollcast_votes_counted_total"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def wait(url, ids, before, fill_json, deadline_s, t0):
    """Samples the votes counted since the restart until the polls show every accepted vote.
    Why the polls decide the end: a flush can land between reading the totals before the
    kill and the kill, so `before` may be short by it; what the restarted process counted is
    its own counter, exactly."""
    accepted = json.load(open(fill_json))["accepted"]
    t0, before = float(t0), int(float(before))
    series, first_move, final, since_start = [], None, None, 0
    deadline = time.time() + float(deadline_s)
    last_totals = 0.0
    while time.time() < deadline:
        now = time.time()
        try:
            since_start = counted_since_start(url)
            series.append((round(now - t0, 2), before + since_start))
            if first_move is None and since_start > 0:
                first_move = now
            # Why the totals so seldom otherwise: reading a hundred polls takes seconds
            # while the store is busy counting, and the samples would be that far apart.
            if before + since_start >= accepted or now - last_totals >= 10:
                last_totals = now
                final = totals(url, ids)
                if final >= accepted:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    done = time.time()
    print(json.dumps({"accepted": accepted, "counted_before_restart": before,
                      "counted_after_restart": since_start, "counted_at_end": final,
                      "first_progress_s": round(first_move - t0, 2) if first_move else None,
                      "done_s": round(done - t0, 2), "series": series}))


def steady_rate(series, before, backlog):
    """Votes counted per second between 10 % and 90 % of the backlog. Why not up to the last
    vote: the last partial flush waits for its poll's flush interval (2 s), which says how
    often counts are written, not how fast."""
    low = next(((t, n) for t, n in series if n - before >= 0.1 * backlog), None)
    high = next(((t, n) for t, n in series if n - before >= 0.9 * backlog), None)
    if not low or not high or high[0] <= low[0]:
        return None
    return (high[1] - low[1]) / (high[0] - low[0])


def report(runs):
    rows = []
    for name in sorted(os.listdir(runs)):
        out = os.path.join(runs, name)
        shape, polls, t0, t_ready = open(os.path.join(out, "variant")).read().split()
        t0, t_ready = float(t0), float(t_ready)
        fill = json.load(open(os.path.join(out, "fill.json")))
        progress = json.load(open(os.path.join(out, "progress.json")))
        viewers = json.load(open(os.path.join(out, "viewers.json")))
        fan = viewers.get("fanout") or {}
        rss = [tuple(map(float, line.split())) for line in open(os.path.join(out, "rss.tsv"))]
        th0 = json.load(open(os.path.join(out, "threads-ready.json")))
        th1 = json.load(open(os.path.join(out, "threads-done.json")))
        d0 = json.load(open(os.path.join(out, "deps-ready.json")))
        d1 = json.load(open(os.path.join(out, "deps-done.json")))
        # The backlog is what the restarted process counted: `counted_before_restart` was
        # read before the kill, and a flush may have landed in between.
        counted = progress.get("counted_after_restart",
                               (progress["counted_at_end"] or 0) - int(progress["counted_before_restart"]))
        backlog = counted
        counting_s = progress["done_s"] - (t_ready - t0)
        from_first = progress["done_s"] - (progress["first_progress_s"] or progress["done_s"])
        rate = steady_rate(progress["series"], int(progress["counted_before_restart"]), backlog)
        overall = backlog / counting_s if counting_s > 0 else None
        busiest = sorted(((n, (th1.get(n, 0) - th0.get(n, 0)) / HZ) for n in th1), key=lambda x: -x[1])[:5]
        deps = {n: round((d1.get(n, 0) - d0.get(n, 0)) / HZ, 1) for n in d1}
        finals = fan.get("final_counts") or {}
        row = {
            "variant": f"{shape}, {polls} poll{'s' if polls != '1' else ''}",
            "shape": shape,
            "polls": int(polls),
            "accepted_per_sec_filling": round(fill["accepted_per_sec"]),
            "backlog": backlog,
            "counted": counted,
            "exact": progress["counted_at_end"] == progress["accepted"],
            "start_to_ready_s": round(t_ready - t0, 2),
            "ready_to_all_counted_s": round(counting_s, 2),
            "first_progress_to_all_counted_s": round(from_first, 2),
            # None when the backlog went by between two samples (then the next figure, ready
            # to all counted, is the rate to go by: a lower bound).
            "counted_per_sec": round(rate) if rate else None,
            "counted_per_sec_ready_to_all": round(overall) if overall else None,
            "ratio_to_accepting": round(rate / fill["accepted_per_sec"], 2) if rate else None,
            "peak_rss_mb": round(max(r for _, r in rss) / 1024, 1) if rss else None,
            "server_cpu_s": round(sum(s for _, s in busiest), 1),
            "busiest_threads_cpu_s": {n: round(s, 1) for n, s in busiest},
            "dependencies_cpu_s": deps,
            "viewers": fan.get("subscribers"),
            "viewers_messages": fan.get("messages"),
            "counts_went_backwards": fan.get("backwards"),
            "viewers_ending_at_final_counts": finals.get("shown"),
            "viewers_checked": finals.get("checked"),
            "progress": progress["series"],
        }
        rows.append(row)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "command": "scripts/bench catchup",
        "target_ratio": TARGET_RATIO,
        "variants": rows,
    }
    json.dump(result, open("bench/results-catchup.json", "w"), indent=2)
    fmt = "{:<22} {:>9} {:>9} {:>6} {:>7} {:>9} {:>11} {:>6} {:>9} {:>9}  {}"
    print(fmt.format("variant", "accepting", "backlog", "exact", "ready", "all in", "counting", "ratio",
                     "peak RSS", "backwards", "busiest threads (CPU s)"))
    for r in rows:
        counting, ratio = f"{r['counted_per_sec']}/s", f"{r['ratio_to_accepting']}x"
        if r["counted_per_sec"] is None and r["counted_per_sec_ready_to_all"]:
            overall = r["counted_per_sec_ready_to_all"]
            counting = f">={overall}/s"
            ratio = f">={round(overall / r['accepted_per_sec_filling'], 2)}x"
        print(fmt.format(r["variant"], f"{r['accepted_per_sec_filling']}/s", r["backlog"], str(r["exact"]),
                         f"{r['start_to_ready_s']} s", f"{r['ready_to_all_counted_s']} s",
                         counting, ratio, f"{r['peak_rss_mb']} MB",
                         r["counts_went_backwards"],
                         ", ".join(f"{n} {s}" for n, s in r["busiest_threads_cpu_s"].items())))
        if r["dependencies_cpu_s"]:
            print(f"{'':<22} dependencies' CPU while counting: {r['dependencies_cpu_s']}")
        print(f"{'':<22} viewers ending at the final counts: {r['viewers_ending_at_final_counts']} of "
              f"{r['viewers_checked']}, {r['viewers_messages']} messages")
    print("ready: restart until /readyz; all in: ready until every vote was counted; counting: votes/s "
          "between 10 % and 90 % of the backlog; ratio: counting over accepting")
    print(f"target: counted at least {TARGET_RATIO}x as fast as accepted; written: bench/results-catchup.json")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "create":
        create(*args)
    elif cmd == "totals":
        print(totals(*args))
    elif cmd == "sample-rss":
        sample_rss(*args)
    elif cmd == "threads":
        threads(args[0])
    elif cmd == "procs":
        procs(args)
    elif cmd == "wait":
        wait(*args)
    elif cmd == "report":
        report(*args)
    else:
        sys.exit(f"catchup.py: unknown command {cmd}")


main()
