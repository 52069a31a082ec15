"""Overload benchmark: goodput when clients ignore Retry-After, against capacity, in one run.

    python -m benchmarks.overload [--model bundle.onnx] [--duration 15] [--storms 256,1024]

1. capacity: ``photoz serve`` (defaults, CPU, max batch 8) driven by 32
   connections posting single-cutout ``.npy`` bodies: successes/s and their
   p99, and the server's CPU per success (/proc, user + system);
2. storms: 256 and 1024 connections that re-send at once after every 429
   (and reconnect at once when the server closes the connection): goodput
   (200s per second) and its ratio to capacity, the p99 of the successes and
   its ratio to capacity's, refusals per second, and an estimate of the
   server's CPU per refusal (CPU of the phase less successes x CPU per
   success at capacity, over the refusals: noisy, as inference's CPU per
   success differs under a storm);
3. refusals only: the server's CPU per refusal measured alone, with its
   queue held full (nothing runs) under the larger storm.

The load comes from :mod:`benchmarks.loadgen` in its own process (uvloop,
raw sockets, pre-encoded requests), which times every request, so success
and refusal latencies are told apart (wrk reports one distribution), and
counts answers by when they arrive (goodput: successes delivered per
second). Each row also carries the server's own view of the phase: its
successes, the cutouts through the model per second, the mean batch and
queue wait, and the cores used by each kind of thread. Without
--model it exports a random-weight pasquet2019_half bundle. Prints a table,
writes JSON to benchmarks/results/. Issue 18's targets: goodput >= 0.8 x
capacity in both storms, p99 of successes <= 2 x capacity's, <= 0.2 ms of
server CPU per refusal.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from benchmarks import loadgen
from benchmarks.serve import cpu_seconds, process_tree, stat_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"


#: the server's own counters read before and after each phase (its view of the phase, beside the client's)
SERVER_COUNTERS = {"server_refusals": 'photoz_requests_total{status="429"}',
                   "refused_before_body": "photoz_refused_before_body_total",
                   "server_successes": 'photoz_requests_total{status="200"}',
                   "server_client_gone": 'photoz_requests_total{status="499"}',
                   "batches": "photoz_batch_size_count", "batched_cutouts": "photoz_batch_size_sum",
                   "queue_wait_s": "photoz_queue_latency_seconds_sum"}


def server_counters(url: str) -> dict[str, float]:
    """The server's counters of :data:`SERVER_COUNTERS` so far (read from /metrics; 0 when absent)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    found = {name: re.search(rf"^{re.escape(metric)} (\S+)$", text, re.M) for name, metric in SERVER_COUNTERS.items()}
    return {name: float(match.group(1)) if match else 0.0 for name, match in found.items()}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s process tree by thread kind (inference, flags, the HTTP side and the rest):
    where the cores went in a phase."""
    kinds = {"photoz-infer": "inference", "photoz-finish": "flags"}
    totals: dict[str, float] = {}
    for p in process_tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            kind = next((v for k, v in kinds.items() if comm.startswith(k)), "http" if task.name == str(p)
                        else "other")
            totals[kind] = totals.get(kind, 0.0) + stat_cpu_seconds(task / "stat")
    return totals


# -- the benchmark ------------------------------------------------------------------------------------------------

def phase(server, connections: int, seconds: float, body_file: Path, settle_s: float) -> dict:
    client = loadgen.start(server.port, "/v1/predict", body_file, connections, seconds, settle_s)
    time.sleep(settle_s)
    # the server's CPU and its own count of refusals over the counted seconds (the client's count misses
    # refusals held across the window's edges: with refusals held for seconds, about half of them)
    cpu_before, counters_before = cpu_seconds(server.proc.pid), server_counters(server.url)
    threads_before = thread_cpu(server.proc.pid)
    time.sleep(seconds)
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    threads = {k: (v - threads_before.get(k, 0.0)) / seconds for k, v in thread_cpu(server.proc.pid).items()}
    counters = {k: v - counters_before[k] for k, v in server_counters(server.url).items()}
    result = loadgen.result(client)
    statuses = result["status"]
    ok, refused = statuses.get(200, 0), statuses.get(429, 0)
    return {"connections": connections, "goodput_per_s": ok / seconds, "refused_per_s": refused / seconds,
            "other_statuses": {k: v for k, v in statuses.items() if k not in (200, 429)},
            "client_errors": result["errors"], "client_cpu_s": result["client_cpu_s"],
            "ok_p50_ms": result["ok_p50_ms"], "ok_p99_ms": result["ok_p99_ms"],
            "server_cpu_s": cpu, "successes": ok, "refusals": refused, **counters,
            # the server's view over the same seconds: cutouts through the model per second, its mean batch, the
            # mean queue wait, and the cores each kind of thread used (inference starved or idle shows here)
            "server_cutouts_per_s": counters["batched_cutouts"] / seconds,
            "mean_batch": counters["batched_cutouts"] / max(counters["batches"], 1),
            "mean_queue_wait_ms": 1000 * counters["queue_wait_s"] / max(counters["batched_cutouts"], 1),
            "cores_by_thread": threads}


def refusal_cost(bundle: Path, work: Path, connections: int, seconds: float, settle_s: float,
                 flags: dict[str, str]) -> dict:
    """Server CPU per refusal, measured alone: a server whose queue is held full (one request of
    max_queue_objects cutouts waiting for a batch that fills in a minute, as even a lone request on an idle engine
    does with wait_when_idle) refuses every request of a storm."""
    import threading

    import httpx

    from photoz.service.live import LiveServer

    # one process: a refusal's cost is a process's, and one held request fills exactly one worker's queue
    flags = {**flags, "max_queue_objects": "64", "max_batch_size": "128", "max_queue_delay_ms": "60000",
             "wait_when_idle": True, "workers": "1"}
    server = LiveServer(bundle, work / "refusals.log", **flags)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((64, 5, 64, 64), np.float32))
    def hold() -> None:
        with contextlib.suppress(httpx.HTTPError):  # answered 503 when the server stops
            httpx.post(server.url + "/v1/predict", content=buffer.getvalue(),
                       headers={"Content-Type": "application/x-npy"}, timeout=120)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        server.wait_queued(64)  # held full
        row = phase(server, connections, seconds, work / "single.npy", settle_s)
    finally:
        server.stop(timeout=5)
    row.update(load="refusals only", cpu_ms_per_refusal=1000 * row["server_cpu_s"] / max(row["server_refusals"], 1))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--storms", default="256,1024")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of each phase not counted (the onset of a storm: every client at once)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--server-flag", action="append", default=[], metavar="NAME=VALUE",
                        help="extra photoz serve flag, e.g. max_queue_wait_ms=250")
    args = parser.parse_args(argv)

    from benchmarks.serve import export_random_bundle, scratch_dir
    from photoz.service.live import LiveServer

    work = scratch_dir("photoz-overload-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(1).normal(0, 0.05, (5, 64, 64)).astype(np.float32))
    (work / "single.npy").write_bytes(buffer.getvalue())
    flags = dict(flag.split("=", 1) for flag in args.server_flag)
    server = LiveServer(bundle, work / "server.log", **flags)
    try:
        capacity = phase(server, 32, args.duration, work / "single.npy", args.settle)
        cpu_per_success = capacity["server_cpu_s"] / max(capacity["successes"], 1)
        rows = [{"load": "capacity", **capacity}]
        for connections in (int(c) for c in args.storms.split(",")):
            row = phase(server, connections, args.duration, work / "single.npy", args.settle)
            refusal_cpu = row["server_cpu_s"] - row["successes"] * cpu_per_success
            row.update(load="storm", goodput_ratio=row["goodput_per_s"] / capacity["goodput_per_s"],
                       p99_ratio=(row["ok_p99_ms"] or float("inf")) / capacity["ok_p99_ms"],
                       cpu_ms_per_refusal=(1000 * refusal_cpu / row["server_refusals"]
                                           if row["server_refusals"] else None))
            rows.append(row)
    finally:
        server.stop()
    rows.append(refusal_cost(bundle, work, max(int(c) for c in args.storms.split(",")), args.duration, args.settle,
                             flags))
    print(f"capacity: {capacity['goodput_per_s']:.0f} successes/s at 32 connections, "
          f"p99 {capacity['ok_p99_ms']:.0f} ms, {1000 * cpu_per_success:.2f} ms server CPU per success")
    print(f"{'load':>9} {'conns':>6} {'goodput/s':>10} {'x cap':>6} {'p99 ok ms':>10} {'x cap':>6} {'429/s':>7} "
          f"{'CPU ms/429':>10} {'% early':>8} {'other':>12} {'errors':>7}")
    for r in rows:
        print(f"{r['load']:>9} {r['connections']:>6} {r['goodput_per_s']:>10.0f} {r.get('goodput_ratio', 1):>6.2f} "
              f"{r['ok_p99_ms'] or float('nan'):>10.0f} {r.get('p99_ratio', 1):>6.2f} {r['refused_per_s']:>7.0f} "
              f"{r.get('cpu_ms_per_refusal') or float('nan'):>10.3f} "
              f"{100 * r['refused_before_body'] / max(r['server_refusals'], 1):>8.0f} {str(r['other_statuses']):>12} "
              f"{r['client_errors']:>7}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overload-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"cores": os.cpu_count(), "duration_s": args.duration, "settle_s": args.settle,
                                "server_flags": flags,
                                "cpu_ms_per_success": 1000 * cpu_per_success, "rows": rows}, indent=1))
    print(f"{'load':>9} {'conns':>6} {'model/s':>8} {'batch':>6} {'wait ms':>8} {'cores by thread':>40}")
    for r in rows:
        cores = " ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores_by_thread"].items()))
        print(f"{r['load']:>9} {r['connections']:>6} {r['server_cutouts_per_s']:>8.0f} {r['mean_batch']:>6.1f} "
              f"{r['mean_queue_wait_ms']:>8.1f} {cores:>40}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
