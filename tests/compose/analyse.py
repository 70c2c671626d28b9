#!/usr/bin/env python3
"""One fault scenario's outcome, from hyfhe-loadtest's --json report and --events lines.

    analyse.py NAME REPORT.json EVENTS.jsonl FAULT_START_MS FAULT_END_MS DUPLICATES ALLOWED_DUPS [BILLED]

Prints one Markdown table row and exits non-zero when the scenario broke a promise: a lost or
wrong result, a final error (a refusal the client's retries did not ride out), a 503 seen outside
the fault window, more duplicate evaluations than the fault can explain, or (BILLED given, a
number: the tenant's billed jobs over the scenario) a bill that differs from the module requests
answered: a job billed twice, or an answer whose bill a fault lost.

Recovery time: from the start of the fault until the last "slow or failed" forward finished,
where slow means a latency above 3x the median before the fault (at least +0.5 s); forwards in
flight when the fault began count. 0 when no forward was slowed down. It can be shorter than the
fault itself: a paused or cut-off worker's shards are taken over after the lease TTL.
"""
import json
import statistics
import sys

# A 503 may still be answered shortly after the fault ended (a request that was already waiting
# for Redis, a retry after its back-off): this much slack after the fault's end.
UNAVAILABLE_SLACK_S = 10.0


def main():
    name, report_path, events_path = sys.argv[1:4]
    fault_start_ms, fault_end_ms, duplicates, allowed_dups = map(int, sys.argv[4:8])
    billed = sys.argv[8] if len(sys.argv) > 8 else "-"
    report = json.load(open(report_path))
    t0 = report["t0_unix_ms"]
    fault_start = (fault_start_ms - t0) / 1e3
    fault_end = (fault_end_ms - t0) / 1e3
    forwards, retries = [], []
    for line in open(events_path):
        e = json.loads(line)
        (retries if "retry" in e else forwards).append(e)

    before = [f["done_s"] - f["due_s"] for f in forwards if f["outcome"] == "ok" and f["done_s"] < fault_start]
    if not before:
        sys.exit(f"{name}: no forward finished before the fault (started {fault_start:.1f} s in)")
    median = statistics.median(before)
    slow = max(3 * median, median + 0.5)
    affected = [f for f in forwards if f["done_s"] >= fault_start]
    bad = [f for f in affected if f["outcome"] != "ok" or f["done_s"] - f["due_s"] > slow]
    recovered_at = max((f["done_s"] for f in bad), default=fault_start)
    recovery = max(0.0, recovered_at - fault_start)

    # Sent and never answered (the drain gave up on them). Forwards the generator never sent
    # (its own cap) are not the cluster's loss, but the run did not offer the load it claims.
    lost = report["unfinished"]
    problems = []
    if lost:
        problems.append(f"{lost} forwards lost")
    if report["not_sent"]:
        problems.append(f"{report['not_sent']} forwards never sent (the load generator fell behind)")
    if report["wrong"]:
        problems.append(f"{report['wrong']} wrong results")
    if report["errors"]:
        problems.append(f"final errors {report['errors_by_code']}")
    late_503 = [r for r in retries if r["retry"] == "unavailable" and not (fault_start <= r["t_s"] <= fault_end + UNAVAILABLE_SLACK_S)]
    if late_503:
        problems.append(f"{len(late_503)} 503s outside the fault window, first at {late_503[0]['t_s']:.1f} s")
    if duplicates > allowed_dups:
        problems.append(f"{duplicates} duplicate evaluations (at most {allowed_dups} explained by the fault)")
    # Every answered module request is one job (retries keep its id), billed once; the sessions'
    # warm-up forwards are billed too.
    answered = report["module_requests"] + report.get("warmup_module_requests", 0)
    if billed != "-" and int(billed) != answered:
        problems.append(f"{billed} jobs billed for {answered} module requests answered (warm-up included)")

    def codes(d):
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    print(
        f"| {name} | {report['sent']} | {report['module_requests']} | {codes(report['errors_by_code'])} "
        f"| {codes(report['retried_by_code'])} | {lost} | {report['wrong']} | {duplicates} | {billed} "
        f"| {fault_end - fault_start:.1f} | {recovery:.1f} | {report['latency_ms_p50']:.0f} "
        f"| {report['latency_ms_max'] / 1e3:.1f} |"
    )
    if problems:
        print(f"{name}: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
