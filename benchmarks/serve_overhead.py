"""What the HTTP path costs per request, without the model: the server's CPU time per request.

    python -m benchmarks.serve_overhead [--model bundle.onnx] [--duration 8]

Serves a bundle with the real app (uvicorn, FastAPI, batcher, decoding,
encoding, metrics) but with the engine's call replaced by a copy of a result
computed once per batch size, so nothing but the serving path uses the CPU.
Drives it with `wrk -t1` posting one-cutout `.npy` bodies (JSON PDFs back,
and `pdf=none`), and reads the server process's CPU time from /proc before
and after: CPU milliseconds per request is the figure to watch (on a CPU
host every one of them is taken from inference), requests/s the capacity of
the path. Prints a table and writes JSON to benchmarks/results/.
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


def serve_without_model(model: str, port: int) -> None:
    """Child mode: the real server, the engine call replaced by a cached result (one per batch size)."""
    from photoz.model.runtime import OnnxPredictor
    from photoz.service.server import serve
    from photoz.service.settings import Settings

    real, cache = OnnxPredictor.predict_with_estimates, {}

    def cached(self, images, ebv, **options):
        n = len(images)
        if n not in cache:
            cache[n] = real(self, images, ebv, **options)
        return {key: value.copy() for key, value in cache[n].items()}

    OnnxPredictor.predict_with_estimates = cached
    serve(Settings.from_env(model=model, port=port, providers="cpu", log_level="warning"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="bundle (default: a random-weight pasquet2019_half)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per load point")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--serve-without-model", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_without_model:
        serve_without_model(args.serve_without_model[0], int(args.serve_without_model[1]))
        return 0

    import httpx

    from benchmarks.serve import export_random_bundle, scratch_dir, wrk
    from photoz.service.live import free_port

    work = scratch_dir("photoz-overhead-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(1).normal(0, 0.05, (5, 64, 64)).astype(np.float32))
    (work / "single.npy").write_bytes(buffer.getvalue())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_overhead", "--serve-without-model", str(bundle),
                             str(port)], cwd=ROOT, stderr=subprocess.STDOUT,
                            stdout=(work / "server.log").open("w"))  # noqa: SIM115 (the child's)
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start:\n{(work / 'server.log').read_text()}")
            time.sleep(0.2)
        for query, label in (("", "JSON, full PDF"), ("?pdf=none", "JSON, pdf=none")):
            for c in (int(x) for x in args.connections.split(",")):
                before = cpu_seconds(proc.pid)
                stats = wrk(url + "/v1/predict" + query, work / "single.npy", "application/x-npy", c, args.duration)
                cpu = cpu_seconds(proc.pid) - before
                requests = stats["requests"]
                rows.append({"response": label, "connections": c, "requests": requests,
                             "errors": stats["socket_errors"] + stats["non2xx"],
                             "requests_per_s": requests / (stats["duration_us"] / 1e6),
                             "server_cpu_ms_per_request": 1e3 * cpu / max(requests, 1),
                             "p50_ms": stats["p50_us"] / 1e3, "p99_ms": stats["p99_us"] / 1e3})
                print(f"{label}, {c} connections: {rows[-1]['requests_per_s']:.0f} requests/s, "
                      f"{rows[-1]['server_cpu_ms_per_request']:.2f} ms of CPU each", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "bundle": str(bundle),
              "load_generator": "wrk -t1", "duration_s": args.duration, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serve-overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print("\n| response | connections | requests/s | server CPU ms per request | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['response']} | {r['connections']} | {r['requests_per_s']:.0f} | "
              f"{r['server_cpu_ms_per_request']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
