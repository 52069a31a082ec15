"""What the HTTP path costs per request, without the model: the server's CPU time per request.

    python -m benchmarks.serve_overhead [--model bundle.onnx] [--duration 8]

Serves a bundle with the real app (uvicorn, FastAPI, batcher, decoding,
encoding, metrics) but with the engine's call replaced by a copy of a result
computed once per batch size, so nothing but the serving path uses the CPU.
Drives it with `wrk -t1` posting one-cutout `.npy` bodies (JSON PDFs back,
and `pdf=none`), after ``--warmup`` seconds of unmeasured load (until then
each new batch size runs the real model, once; repeated until a window
completes requests), and reads the server's CPU
time (its process and worker processes) from /proc before and after: CPU
milliseconds per request is the figure to watch (on a CPU host every one of
them is taken from inference), requests/s the capacity of the path. Runs once per ``--workers`` count
(PHOTOZ_WORKERS, default 1 and 2) in one run, and prints the scaling against
one worker: requests/s and CPU per request. Prints a table and writes JSON
to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def cache_engine_calls() -> None:
    """Replace the engine's call by a copy of a result computed once per batch size (this process only)."""
    from photoz.model.runtime import OnnxPredictor

    real, cache = OnnxPredictor.predict_with_estimates, {}

    def cached(self, images, ebv, **options):
        n = len(images)
        if n not in cache:
            cache[n] = real(self, images, ebv, **options)
        return {key: value.copy() for key, value in cache[n].items()}

    OnnxPredictor.predict_with_estimates = cached


def cached_worker(settings, listener) -> None:
    """A worker process of the supervisor with its engine's call cached."""
    from photoz.service.server import run_worker

    cache_engine_calls()
    run_worker(settings, listener)


def serve_without_model(model: str, port: int, workers: int) -> None:
    """Child mode: the real server (``workers`` processes), the engine call replaced by a cached result."""
    import logging

    from photoz.service.server import run_server
    from photoz.service.settings import Settings
    from photoz.service.workers import Supervisor, worker_settings

    settings = Settings.from_env(model=model, port=port, providers="cpu", log_level="warning", workers=workers)
    if workers == 1:
        cache_engine_calls()
        run_server(settings)
        return
    logging.basicConfig(level="WARNING")
    Supervisor(worker_settings(settings, workers), workers, cached_worker).run()


def start_server(bundle: Path, workers: int, work: Path):
    import httpx

    from photoz.service.live import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / f"server-{workers}.log"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_overhead", "--serve-without-model", str(bundle),
                             str(port), str(workers)], cwd=ROOT, stderr=subprocess.STDOUT,
                            stdout=log.open("w"))  # noqa: SIM115 (the child's)
    deadline = time.monotonic() + 120
    while True:
        try:  # ready, and with workers every one of them has its engine (its own samples in /metrics)
            every = workers == 1 or httpx.get(url + "/metrics", timeout=5).text.count("photoz_queue_depth{") == workers
            if every and httpx.get(url + "/readyz", timeout=1).status_code == 200:
                time.sleep(2 if workers > 1 else 0)  # the last worker's warm-up
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.2)


def scaling(rows: list[dict]) -> list[dict]:
    """Each load point with more than one worker against the same point with one, measured in the same run."""
    one = {(r["response"], r["connections"]): r for r in rows if r["workers"] == 1}
    return [{"workers": r["workers"], "response": r["response"], "connections": r["connections"],
             "requests_per_s_ratio": r["requests_per_s"] / base["requests_per_s"],
             "cpu_per_request_ratio": r["server_cpu_ms_per_request"] / base["server_cpu_ms_per_request"]}
            for r in rows if r["workers"] > 1 and (base := one.get((r["response"], r["connections"])))
            and base["requests"] > 0]  # a point that answered nothing has no ratio (its row shows it)


#: Warm-up windows at most: a loaded machine can spend a whole window on a server's first batches
WARMUP_WINDOWS = 10


def warm_up(wrk, url: str, body: Path, connections: int, seconds: int) -> int:
    """``seconds`` of unmeasured load, repeated until a window completes requests (at most ``WARMUP_WINDOWS``):
    until then every new batch size runs the real model, and on a loaded machine the first ones can take a
    whole window (a smoke run measured 0 requests in its first second). The windows it took."""
    for window in range(1, WARMUP_WINDOWS + 1):
        if wrk(url, body, "application/x-npy", connections, seconds)["requests"] > 0:
            return window
    return WARMUP_WINDOWS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="bundle (default: a random-weight pasquet2019_half)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per load point")
    parser.add_argument("--warmup", type=int, default=3,
                        help="seconds of unmeasured load on each server first (the cache of engine results fills)")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--workers", default="1,2", help="worker process counts to compare, in one run")
    parser.add_argument("--responses", default="full,none", help="full: JSON with the PDF; none: pdf=none")
    parser.add_argument("--serve-without-model", nargs=3, metavar=("MODEL", "PORT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_without_model:
        model, port, workers = args.serve_without_model
        serve_without_model(model, int(port), int(workers))
        return 0

    from benchmarks.serve import cpu_seconds, export_random_bundle, scratch_dir, wrk

    work = scratch_dir("photoz-overhead-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(1).normal(0, 0.05, (5, 64, 64)).astype(np.float32))
    (work / "single.npy").write_bytes(buffer.getvalue())
    responses = {"full": ("", "JSON, full PDF"), "none": ("?pdf=none", "JSON, pdf=none")}
    rows, connections = [], [int(x) for x in args.connections.split(",")]
    for workers in (int(x) for x in args.workers.split(",")):
        proc, url = start_server(bundle, workers, work)
        try:  # steady state: the first batches of each size run the real model once, and the loop warms up
            if args.warmup > 0:
                warm_up(wrk, url + "/v1/predict", work / "single.npy", max(connections), args.warmup)
            for query, label in (responses[r] for r in args.responses.split(",")):
                for c in connections:
                    before = cpu_seconds(proc.pid)
                    stats = wrk(url + "/v1/predict" + query, work / "single.npy", "application/x-npy", c,
                                args.duration)
                    cpu = cpu_seconds(proc.pid) - before
                    requests = stats["requests"]
                    rows.append({"workers": workers, "response": label, "connections": c, "requests": requests,
                                 "errors": stats["socket_errors"] + stats["non2xx"],
                                 "requests_per_s": requests / (stats["duration_us"] / 1e6),
                                 "server_cpu_ms_per_request": 1e3 * cpu / max(requests, 1),
                                 "p50_ms": stats["p50_us"] / 1e3, "p99_ms": stats["p99_us"] / 1e3})
                    print(f"{workers} worker(s), {label}, {c} connections: {rows[-1]['requests_per_s']:.0f} "
                          f"requests/s, {rows[-1]['server_cpu_ms_per_request']:.2f} ms of CPU each", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "bundle": str(bundle),
              "load_generator": "wrk -t1", "duration_s": args.duration, "warmup_s": args.warmup, "rows": rows,
              "scaling": scaling(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serve-overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print("\n| workers | response | connections | requests/s | server CPU ms per request | single cutouts/s a 16-core "
          "host's HTTP side could take | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['response']} | {r['connections']} | {r['requests_per_s']:.0f} | "
              f"{r['server_cpu_ms_per_request']:.2f} | {16e3 / max(r['server_cpu_ms_per_request'], 1e-9):,.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    for s in report["scaling"]:
        print(f"\n{s['response']}, {s['connections']} connections: {s['workers']} workers give "
              f"{s['requests_per_s_ratio']:.2f}x the requests/s of one, at {s['cpu_per_request_ratio']:.2f}x its CPU "
              "per request")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
