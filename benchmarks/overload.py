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

The load comes from an asyncio client in its own process (uvloop, raw
sockets, pre-encoded requests) that times every request, so success and
refusal latencies are told apart (wrk reports one distribution). Without
--model it exports a random-weight pasquet2019_half bundle. Prints a table,
writes JSON to benchmarks/results/. Issue 18's targets: goodput >= 0.8 x
capacity in both storms, p99 of successes <= 2 x capacity's, <= 0.2 ms of
server CPU per refusal.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.serve import cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"


def server_refusals(url: str, metric: str = 'photoz_requests_total{status="429"}') -> float:
    """The 429s the server has answered so far (its own counter, read from /metrics); ``metric``
    ``photoz_refused_before_body_total``: those decided from the headers alone."""
    import httpx

    match = re.search(rf"^{re.escape(metric)} (\S+)$", httpx.get(url + "/metrics", timeout=30).text, re.M)
    return float(match.group(1)) if match else 0.0


# -- the storm client (runs in its own process) ------------------------------------------------------------------

async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers.get("connection", "").lower() == "close"


async def _connection(port: int, request: bytes, counting_from: float, deadline: float, stats: dict) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.perf_counter()
            status, close = await _exchange(reader, writer, request)
            elapsed = time.perf_counter() - start
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            stats["errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.001)
            continue
        if counting_from <= time.monotonic() - elapsed and time.monotonic() <= deadline:
            stats["status"][status] = stats["status"].get(status, 0) + 1
            if status == 200:
                stats["ok_latency"].append(elapsed)
        if close:  # Retry-After ignored: reconnect and send again at once
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def storm_client(port: int, connections: int, seconds: float, body_file: str, settle_s: float = 0.0) -> dict:
    """Requests from ``connections`` clients for ``settle_s`` + ``seconds``; only those sent after the first
    ``settle_s`` count (the steady state, not the onset of the storm)."""
    body = Path(body_file).read_bytes()
    request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    stats: dict = {"status": {}, "ok_latency": [], "errors": 0}

    async def run() -> None:
        counting_from = time.monotonic() + settle_s
        deadline = counting_from + seconds
        await asyncio.gather(*(_connection(port, request, counting_from, deadline, stats)
                               for _ in range(connections)))

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    latency = np.array(stats["ok_latency"]) * 1000
    return {"status": stats["status"], "errors": stats["errors"], "seconds": seconds,
            "client_cpu_s": time.process_time(),
            "ok_p50_ms": float(np.percentile(latency, 50)) if latency.size else None,
            "ok_p99_ms": float(np.percentile(latency, 99)) if latency.size else None}


# -- the benchmark ------------------------------------------------------------------------------------------------

def phase(server, connections: int, seconds: float, body_file: Path, settle_s: float) -> dict:
    client = subprocess.Popen([sys.executable, "-m", "benchmarks.overload", "--client", str(server.port),
                               str(connections), str(seconds), str(body_file), str(settle_s)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    time.sleep(settle_s)
    # the server's CPU and its own count of refusals over the counted seconds (the client's count misses
    # refusals held across the window's edges: with refusals held for seconds, about half of them)
    early = "photoz_refused_before_body_total"
    cpu_before, refused_before = cpu_seconds(server.proc.pid), server_refusals(server.url)
    early_before = server_refusals(server.url, early)
    time.sleep(seconds)
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    server_refused = server_refusals(server.url) - refused_before
    refused_before_body = server_refusals(server.url, early) - early_before
    stdout, _ = client.communicate()
    result = json.loads(stdout.strip().splitlines()[-1])
    statuses = {int(k): v for k, v in result["status"].items()}
    ok, refused = statuses.get(200, 0), statuses.get(429, 0)
    return {"connections": connections, "goodput_per_s": ok / seconds, "refused_per_s": refused / seconds,
            "other_statuses": {k: v for k, v in statuses.items() if k not in (200, 429)},
            "client_errors": result["errors"], "client_cpu_s": result["client_cpu_s"],
            "ok_p50_ms": result["ok_p50_ms"], "ok_p99_ms": result["ok_p99_ms"],
            "server_cpu_s": cpu, "successes": ok, "refusals": refused, "server_refusals": server_refused,
            "refused_before_body": refused_before_body}


def refusal_cost(bundle: Path, work: Path, connections: int, seconds: float, settle_s: float,
                 flags: dict[str, str]) -> dict:
    """Server CPU per refusal, measured alone: a server whose queue is held full (one request of
    max_queue_objects cutouts waiting for a batch that fills in a minute) refuses every request of a storm."""
    import threading

    import httpx

    from photoz.service.live import LiveServer

    # one process: a refusal's cost is a process's, and one held request fills exactly one worker's queue
    flags = {**flags, "max_queue_objects": "64", "max_batch_size": "128", "max_queue_delay_ms": "60000",
             "workers": "1"}
    server = LiveServer(bundle, work / "refusals.log", **flags)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((64, 5, 64, 64), np.float32))
    def hold() -> None:
        with contextlib.suppress(httpx.HTTPError):  # answered 503 when the server stops
            httpx.post(server.url + "/v1/predict", content=buffer.getvalue(),
                       headers={"Content-Type": "application/x-npy"}, timeout=120)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    time.sleep(1)
    try:
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
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, connections, seconds, body, settle = sys.argv[2:7]
        print(json.dumps(storm_client(int(port), int(connections), float(seconds), body, float(settle))))
        raise SystemExit(0)
    raise SystemExit(main())
