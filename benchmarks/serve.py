"""Serving benchmark: photoz over HTTP against the engine offline and against LitServe, in one run.

    python benchmarks/serve.py [--model bundle.onnx] [--duration 10]

1. offline: the ONNX Runtime engine alone at several batch sizes (best = reference);
2. photoz served on 127.0.0.1, driven by wrk (one client thread, so the load
   generator does not eat the server's cores) at 1, 8, 32 and 128 connections
   posting single cutouts, and with requests of 256 cutouts;
3. the same bundle served by LitServe with its own dynamic batching, same load.

Prints a table (throughput in cutouts/s, p50/p95/p99 latency, mean batch
size, ratio to offline) and writes JSON to benchmarks/results/. Without
--model it exports a random-weight pasquet2019_half bundle (throughput does
not depend on the weights).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import LiveServer, free_port  # noqa: E402

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "non2xx": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(95),
    latency:percentile(99)))
end
"""


def export_random_bundle(path: Path) -> Path:
    import torch

    from model.export import export_bundle, make_metadata, untrained_record
    from model.pasquet import build

    torch.manual_seed(0)
    net = build("pasquet2019_half").eval()
    export_bundle(net, path, make_metadata(net, "pasquet2019_half", "benchmark-random", "0", untrained_record()))
    return path


def offline_throughput(bundle_path: Path, sizes=(1, 8, 16, 32, 64), seconds: float = 1.5, passes: int = 2) -> dict:
    """Cutouts/s of the engine alone per batch size, in its best arrangement on this machine.

    Two arrangements are timed: one session using every core, and one
    single-threaded run per core in parallel (the server's default); each
    figure is the best of interleaved passes, so machine noise lowers
    nothing but the served/offline ratios' denominators can only go up.
    """
    import threading

    from model.bundle import load_bundle
    from model.runtime import OnnxPredictor

    bundle = load_bundle(bundle_path)
    cores = os.cpu_count() or 1
    arrangements = {"1 session x all cores": (1, 0), f"{cores} runs x 1 thread": (cores, 1)}
    rng = np.random.default_rng(0)
    out = {name: {n: 0.0 for n in sizes} for name in arrangements}
    for _ in range(passes):
        for name, (workers, threads) in arrangements.items():
            predictor = OnnxPredictor(bundle, providers="cpu", intra_op_threads=threads, allow_spinning=False)
            for n in sizes:
                images = rng.normal(0, 0.05, (n, 5, 64, 64)).astype(np.float32)
                ebv = np.zeros(n, np.float32)
                predictor.predict(images, ebv)
                counts = [0] * workers

                def run(i):
                    start = time.perf_counter()
                    while time.perf_counter() - start < seconds:
                        predictor.predict(images, ebv)
                        counts[i] += n

                start = time.perf_counter()
                threads_ = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
                for t in threads_:
                    t.start()
                for t in threads_:
                    t.join()
                out[name][n] = max(out[name][n], sum(counts) / (time.perf_counter() - start))
    return out


def wrk(url: str, body_file: Path, content_type: str, connections: int, duration: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT)
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type}
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "-s", fh.name,
                             url], capture_output=True, text=True, env=env, check=True)
    os.unlink(fh.name)
    match = re.search(r"WRKJSON (\{.*\})", result.stdout)
    if not match:
        raise RuntimeError(f"no summary from wrk:\n{result.stdout}\n{result.stderr}")
    return json.loads(match.group(1))


def batch_counts(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    values = {}
    for name in ("photoz_batch_size_sum", "photoz_batch_size_count"):
        values[name] = float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
    return values["photoz_batch_size_sum"], values["photoz_batch_size_count"]


def run_load(name, url, body_file, content_type, connections, duration, cutouts_per_request, metrics_url=None):
    before = batch_counts(metrics_url) if metrics_url else None
    stats = wrk(url, body_file, content_type, connections, duration)
    row = {"server": name, "connections": connections, "cutouts_per_request": cutouts_per_request,
           "requests": stats["requests"], "errors": stats["socket_errors"] + stats["non2xx"],
           "cutouts_per_s": stats["requests"] * cutouts_per_request / (stats["duration_us"] / 1e6),
           "p50_ms": stats["p50_us"] / 1e3, "p95_ms": stats["p95_us"] / 1e3, "p99_ms": stats["p99_us"] / 1e3}
    if metrics_url:
        after = batch_counts(metrics_url)
        row["mean_batch_size"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return row


def stop_group(proc: subprocess.Popen) -> None:
    """Stop LitServe and the worker processes it spawned."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_litserve(bundle: Path, max_batch_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "litserve_peer.py"), "--model", str(bundle),
                             "--port", str(port), "--max-batch-size", str(max_batch_size)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_group(proc)
    raise TimeoutError(f"LitServe did not start:\n{log.read_text()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="bundle (default: a random-weight pasquet2019_half)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load point")
    parser.add_argument("--connections", default="1,8,32,128")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    conns = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="photoz-bench-"))
    bundle = args.model or export_random_bundle(work / "bench.onnx")

    rng = np.random.default_rng(1)
    single, many = rng.normal(0, 0.05, (5, 64, 64)).astype(np.float32), rng.normal(0, 0.05, (256, 5, 64, 64)).astype(np.float32)
    for name, array in (("single.npy", single), ("batch256.npy", many)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        (work / name).write_bytes(buffer.getvalue())
    (work / "single.json").write_text(json.dumps({"npy": base64.b64encode((work / "single.npy").read_bytes()).decode()}))

    print("offline engine throughput (ONNX Runtime, CPU) ...", flush=True)
    offline = offline_throughput(bundle)

    rows = []
    server = LiveServer(bundle, work / "photoz.log", max_batch_size=args.max_batch_size,
                        max_queue_delay_ms=args.max_queue_delay_ms, max_queue_objects=100000,
                        providers="cpu", log_level="warning")
    try:
        for c in conns:
            print(f"photoz, {c} connections ...", flush=True)
            rows.append(run_load("photoz", server.url + "/v1/predict", work / "single.npy", "application/x-npy", c,
                                 args.duration, 1, server.url))
        print("photoz, requests of 256 cutouts ...", flush=True)
        # long enough for many 256-cutout requests (each takes about a second)
        rows.append(run_load("photoz", server.url + "/v1/predict", work / "batch256.npy", "application/x-npy", 2,
                             3 * args.duration, 256, server.url))
    finally:
        server.stop()
    if not args.skip_litserve:
        proc, url = start_litserve(bundle, args.max_batch_size, work / "litserve.log")
        try:
            for c in conns:
                print(f"LitServe, {c} connections ...", flush=True)
                rows.append(run_load("litserve", url + "/predict", work / "single.json", "application/json", c,
                                     args.duration, 1))
        finally:
            stop_group(proc)

    print("offline engine throughput again ...", flush=True)
    after = offline_throughput(bundle)
    offline = {name: {n: max(v, after[name][n]) for n, v in sizes.items()} for name, sizes in offline.items()}
    best_arrangement, best_size = max(((a, n) for a in offline for n in offline[a]), key=lambda k: offline[k[0]][k[1]])
    best = offline[best_arrangement][best_size]
    for row in rows:
        row["ratio_to_offline"] = row["cutouts_per_s"] / best
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "bundle": str(bundle),
              "offline_cutouts_per_s": offline, "offline_best_batch_size": best_size,
              "offline_best_arrangement": best_arrangement, "offline_best": best,
              "settings": {"max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                           "duration_s": args.duration, "load_generator": "wrk -t1"}, "rows": rows}
    photoz32 = next((r for r in rows if r["server"] == "photoz" and r["connections"] == 32 and r["cutouts_per_request"] == 1), None)
    lit32 = next((r for r in rows if r["server"] == "litserve" and r["connections"] == 32), None)
    if photoz32 and lit32:
        report["photoz_over_litserve_at_32"] = photoz32["cutouts_per_s"] / lit32["cutouts_per_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"\nwrote {out}")
    return 0


def format_table(report: dict) -> str:
    lines = [f"offline engine, {name}: " + ", ".join(f"batch {k}: {v:.0f}/s" for k, v in sizes.items())
             for name, sizes in report["offline_cutouts_per_s"].items()]
    lines += [f"best offline: {report['offline_best']:.0f} cutouts/s ({report['offline_best_arrangement']}, "
              f"batch {report['offline_best_batch_size']})", "",
             "| server | connections | cutouts/request | cutouts/s | x offline | p50 ms | p95 ms | p99 ms | mean batch | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        batch = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else "-"
        lines.append(f"| {r['server']} | {r['connections']} | {r['cutouts_per_request']} | {r['cutouts_per_s']:.0f} | "
                     f"{r['ratio_to_offline']:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{batch} | {r['errors']} |")
    if "photoz_over_litserve_at_32" in report:
        lines.append(f"\nphotoz / LitServe at 32 connections: {report['photoz_over_litserve_at_32']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
