"""The report of `scripts/bench viewers` (scripts/lib/viewers.sh): reads each phase's files,
writes bench/results-viewers.json and prints the tables.

Usage: viewers_report.py RUNS_DIR RATE SECONDS KILL_AT WATCHERS PHASE...
"""

import json
import os
import platform
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
# Targets of the issue: every viewer ends with the final counts, fan-out p99 within 1 s,
# at most 15 KB of server RSS per viewer.
FANOUT_P99_MS = 1000
RSS_KB_PER_VIEWER = 15


def servers(path):
    """index -> (pid, rss_kb, cpu_ticks, open_files, kernel_ticks), from a sample_servers
    file."""
    rows = {}
    for line in open(path):
        i, pid, rss, user, kernel, files = line.split()
        rows[int(i)] = (int(pid), int(rss or 0), int(user) + int(kernel), int(files or 0), int(kernel))
    return rows


def others_s(out):
    """group -> CPU-seconds over the votes' window of the processes in that group (the
    broker, the viewers' load generators), from the two sample_others files; {} if absent."""
    def read(f):
        path = os.path.join(out, f)
        rows = {}
        if os.path.exists(path):
            for line in open(path):
                group, pid, user, kernel = line.split()
                rows[(group, pid)] = int(user) + int(kernel)
        return rows
    before, after = read("others-connected.tsv"), read("others-voted.tsv")
    spent = {}
    for (group, pid), ticks in after.items():
        if (group, pid) in before:
            spent[group] = spent.get(group, 0) + (ticks - before[(group, pid)]) / HZ
    return spent


def machine_busy_s(out):
    """The whole machine's busy CPU-seconds (every core, every process and the kernel's own
    threads: softirqs handed to ksoftirqd too) between the window's two /proc/stat samples."""
    def read(f):
        path = os.path.join(out, f)
        if not os.path.exists(path):
            return None
        fields = [int(x) for x in open(path).read().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle
    before, after = read("stat-before"), read("stat-after")
    return None if before is None or after is None else (after - before) / HZ


def phase_summary(out, name, rate, seconds, kill_at):
    audience, kill, t_launch, t_connected, t_kill = open(os.path.join(out, "phase")).read().split("\n")[:5]
    hosts = open(os.path.join(out, "hosts")).read().split()
    # The ceiling phase sends no votes: its broadcasters update on their own.
    votes_path = os.path.join(out, "votes.json")
    votes = json.load(open(votes_path)) if os.path.exists(votes_path) else None
    viewers = json.load(open(os.path.join(out, "viewers.json")))
    fan = viewers["fanout"]
    empty = servers(os.path.join(out, "servers-empty.tsv"))
    connected = servers(os.path.join(out, "servers-connected.tsv"))
    voted = servers(os.path.join(out, "servers-voted.tsv"))
    vote_secs = votes["seconds"] if votes else seconds
    processes = []
    # After a kill, each survivor also holds its expected share of the dead one's viewers
    # (each came back to one chosen at random).
    moved = fan["by_target"].get(hosts[-1], 0) / (len(hosts) - 1) if kill == "yes" and len(hosts) > 1 else 0
    for i, host in enumerate(hosts, 1):
        on = fan["by_target"].get(host, 0)
        delay = fan.get("delay_by_target", {}).get(host)
        rss_growth = connected[i][1] - empty[i][1]
        killed = kill == "yes" and i == len(hosts)
        # Why two RSS figures: 3 s after the connect storm the heap still holds the freed
        # buffers of the viewers' handshakes (jemalloc returns freed pages over about 10 s),
        # so that sample is a transient peak. The one after the votes is what the process
        # holds for its viewers once settled (the vote path's few connections included).
        held = None if killed else (voted[i][1] - empty[i][1]) / (on + moved) if on else None
        cpu_s = None if killed else (voted[i][2] - connected[i][2]) / HZ
        kernel_s = None if killed else (voted[i][4] - connected[i][4]) / HZ
        messages = delay["samples"] if delay else 0
        processes.append({
            "process": f"p{i}",
            "viewers_at_start": on,
            "open_files_connected": connected[i][3],
            "rss_mb_empty": round(empty[i][1] / 1024, 1),
            "rss_mb_connected": round(connected[i][1] / 1024, 1),
            "rss_mb_after_votes": None if killed else round(voted[i][1] / 1024, 1),
            "rss_kb_per_viewer": round(held, 2) if held is not None else None,
            "rss_kb_per_viewer_after_connecting": round(rss_growth / on, 2) if on else None,
            "killed": killed,
            "cpu_share_of_a_core": round(cpu_s / vote_secs, 3) if cpu_s is not None else None,
            "cpu_us_per_message": round(cpu_s * 1e6 / messages, 1) if cpu_s and messages else None,
            # Why the kernel's share: delivering into a loopback socket runs the receiver's
            # TCP input too, on the sender's CPU; over a network the viewer's machine does it.
            "kernel_share_of_cpu": round(kernel_s / cpu_s, 2) if cpu_s else None,
            "messages": messages,
            "fanout_p50_ms": delay["p50_ms"] if delay else None,
            "fanout_p99_ms": delay["p99_ms"] if delay else None,
            "fanout_max_ms": delay["max_ms"] if delay else None,
        })
    verification = (votes or {}).get("verification") or {}
    finals = fan.get("final_counts") or {}
    reconnect = fan.get("reconnect_delay") or {}
    per_viewer = [p["rss_kb_per_viewer"] for p in processes if p["rss_kb_per_viewer"] is not None]
    per_viewer_peak = [p["rss_kb_per_viewer_after_connecting"] for p in processes
                       if p["rss_kb_per_viewer_after_connecting"] is not None]
    busy = machine_busy_s(out)
    # Messages in the window: every viewer gets an update every 2 s (a flush, or a tick).
    window_messages = fan["connected"] * vote_secs / 2
    summary = {
        "viewers": int(audience),
        "viewers_connected": fan["connected"],
        "connect_all_s": round(float(t_connected) - float(t_launch), 1),
        "fanout_p50_ms": fan["delay"]["p50_ms"],
        "fanout_p99_ms": fan["delay"]["p99_ms"],
        "fanout_max_ms": fan["delay"]["max_ms"],
        "messages": fan["messages"],
        "updates_missed": fan["missed_updates"],
        "counts_went_backwards": fan["backwards"],
        "viewers_ending_at_final_counts": finals.get("shown"),
        "viewers_checked": finals.get("checked"),
        "viewers_live_at_end": fan.get("live_at_end"),
        "disconnects": fan.get("disconnects", 0),
        "reconnects": fan.get("reconnects", 0),
        "all_back_s": round(reconnect["max_ms"] / 1000, 2) if reconnect else None,
        "reconnect_p99_ms": reconnect.get("p99_ms"),
        **({
            "votes_accepted": votes["accepted"],
            "votes_per_sec": round(votes["accepted_per_sec"]),
            "vote_errors": votes["errors"],
            "votes_left_after_retries": (votes.get("retry") or {}).get("unresolved"),
            "vote_p50_ms": votes["latency"]["p50_ms"],
            "vote_p99_ms": votes["latency"]["p99_ms"],
            "vote_max_ms": votes["latency"]["max_ms"],
        } if votes else {}),
        "counted_equals_accepted": verification.get("exact"),
        "lost": verification.get("lost"),
        "doubled": verification.get("doubled"),
        "max_rss_kb_per_viewer": max(per_viewer) if per_viewer else None,
        "max_rss_kb_per_viewer_after_connecting": max(per_viewer_peak) if per_viewer_peak else None,
        # Every message's whole cost on this machine: the server's, the kernel's loopback
        # delivery wherever it ran, and the viewers' load generators'. One update to every
        # viewer takes that times the audience, over the machine's cores.
        "machine_cpu_us_per_message": (round(busy * 1e6 / window_messages, 1)
                                        if busy and window_messages else None),
        # Who else spent it: the test broker (tansu; none in the ceiling phase) and the
        # viewers' load generators, which a real audience runs on its own devices.
        **{f"{group}_cpu_us_per_message": round(secs * 1e6 / window_messages, 1)
           for group, secs in others_s(out).items() if window_messages},
        "loadavg_1m_before_after": [float(open(os.path.join(out, f)).read().split()[0])
                                    for f in ("loadavg-before", "loadavg-after")],
    }
    met = (summary["viewers_connected"] == summary["viewers"]
           and summary["viewers_ending_at_final_counts"] == summary["viewers_checked"]
           and summary["counts_went_backwards"] == 0
           and summary["fanout_p99_ms"] <= FANOUT_P99_MS
           and (summary["max_rss_kb_per_viewer"] or 0) <= RSS_KB_PER_VIEWER
           and summary["counted_equals_accepted"] is True)
    if kill == "yes":
        met = met and summary["viewers_live_at_end"] == summary["viewers_connected"]
    if name == "ceiling":
        # Not pollcast: what the machine allows at best, to compare the other phases with.
        met = None
    return {"phase": name, "killed_at_s": kill_at if kill == "yes" else None, "target_met": met,
            "summary": summary, "processes": processes, "votes": votes, "viewers": viewers}


def main():
    runs, rate, seconds, kill_at, watchers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5])
    phases = [phase_summary(os.path.join(runs, p), p, rate, seconds, kill_at) for p in sys.argv[6:]]
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "command": "scripts/bench viewers",
        "settings": {"processes": 6, "vote_rate_per_s": rate, "seconds": seconds,
                     "viewer_load_generators": watchers, "kill_at_s": kill_at},
        "phases": phases,
    }
    ceiling = next((p["summary"] for p in phases if p["phase"] == "ceiling"), None)
    for p in phases:
        # The raw reports are big (histograms); keep them out of the summary file's head.
        if p["votes"]:
            p["votes"]["fanout"] = None
        if ceiling and p["phase"] != "ceiling":
            p["summary"]["fanout_p99_over_ceiling"] = round(p["summary"]["fanout_p99_ms"] / ceiling["fanout_p99_ms"], 2)
    json.dump(result, open("bench/results-viewers.json", "w"), indent=2)

    for p in phases:
        s = p["summary"]
        if p["phase"] == "ceiling":
            print(f"\nviewers, phase ceiling: {s['viewers']} viewers over 6 bare broadcasters "
                  f"(bench/fanout_ceiling.rs), an update every 2 s for {seconds} s")
        else:
            print(f"\nviewers, phase {p['phase']}: {s['viewers']} viewers over 6 processes, votes at {rate}/s "
                  f"for {seconds} s" + (f", p6 killed with SIGKILL {kill_at} s in" if p["killed_at_s"] else ""))
        rows = [
            ("viewers connected", f"{s['viewers_connected']} of {s['viewers']} in {s['connect_all_s']} s"),
            ("fan-out flush→screen", f"p50 {s['fanout_p50_ms']:.0f} ms, p99 {s['fanout_p99_ms']:.0f} ms, "
                                     f"max {s['fanout_max_ms']:.0f} ms ({s['messages']} messages)"),
            ("updates missed (coalesced)", s["updates_missed"]),
            ("counts went backwards", s["counts_went_backwards"]),
            ("viewers ending at the final counts", f"{s['viewers_ending_at_final_counts']} of {s['viewers_checked']}"),
            ("viewers live at the end", s["viewers_live_at_end"]),
        ]
        if "votes_accepted" in s:
            rows += [
                ("votes", f"{s['votes_accepted']} accepted ({s['votes_per_sec']}/s), errors {s['vote_errors'] or 'none'}, "
                          f"left after retries {s['votes_left_after_retries']}"),
                ("vote latency", f"p50 {s['vote_p50_ms']:.1f} ms, p99 {s['vote_p99_ms']:.1f} ms, max {s['vote_max_ms']:.0f} ms"),
                ("counted == accepted", f"{s['counted_equals_accepted']} (lost {s['lost']}, doubled {s['doubled']})"),
            ]
        if s.get("machine_cpu_us_per_message"):
            rows.append(("machine CPU per message", f"{s['machine_cpu_us_per_message']} us (all processes, "
                                                    f"{os.cpu_count()} cores)"))
        for group, label in (("broker", "broker (tansu)"), ("viewers", "viewers' load generators")):
            if s.get(f"{group}_cpu_us_per_message") is not None:
                rows.append((f"  of which {label}", f"{s[f'{group}_cpu_us_per_message']} us"))
        if "fanout_p99_over_ceiling" in s:
            rows.append(("fan-out p99 over the ceiling's", f"{s['fanout_p99_over_ceiling']}"))
        if p["killed_at_s"]:
            rows.append(("viewers reconnected", f"{s['reconnects']} of {s['disconnects']} disconnects; all back "
                                                f"{s['all_back_s']} s after the kill (p99 {s['reconnect_p99_ms']} ms)"))
        for k, v in rows:
            print(f"  {k:<36} {v}")
        fmt = "  {:<5} {:>8} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>7} {:>10} {:>9}"
        print(fmt.format("proc", "viewers", "files", "RSS empty", "RSS conn.", "RSS held", "KB/viewer",
                         "(conn.)", "CPU/core", "us/message", "kernel", "p99 ms", "max ms"))
        dash = lambda v: v if v is not None else "-"
        for q in p["processes"]:
            print(fmt.format(q["process"] + ("†" if q["killed"] else ""), q["viewers_at_start"],
                             q["open_files_connected"], f"{q['rss_mb_empty']} MB", f"{q['rss_mb_connected']} MB",
                             f"{q['rss_mb_after_votes']} MB" if q["rss_mb_after_votes"] is not None else "-",
                             dash(q["rss_kb_per_viewer"]), dash(q["rss_kb_per_viewer_after_connecting"]),
                             q["cpu_share_of_a_core"] if q["cpu_share_of_a_core"] is not None else "-",
                             q["cpu_us_per_message"] if q["cpu_us_per_message"] is not None else "-",
                             q["kernel_share_of_cpu"] if q["kernel_share_of_cpu"] is not None else "-",
                             f"{q['fanout_p99_ms']:.0f}" if q["fanout_p99_ms"] is not None else "-",
                             f"{q['fanout_max_ms']:.0f}" if q["fanout_max_ms"] is not None else "-"))
        print("  RSS held: after the votes; KB/viewer: what it grew by per viewer then, and 3 s after the "
              "viewers connected (conn.), while the heap still held their handshakes' freed buffers")
        if p["target_met"] is not None:
            print(f"  targets (final counts on every screen, fan-out p99 <= {FANOUT_P99_MS} ms, "
                  f"<= {RSS_KB_PER_VIEWER} KB held per viewer, exact counts): {'met' if p['target_met'] else 'NOT met'}")
    print("\nwritten: bench/results-viewers.json")


main()
