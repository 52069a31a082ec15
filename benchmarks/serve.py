"""Serving benchmark: photoz over HTTP against the engine offline and against LitServe, in one run.

    python -m benchmarks.serve [--model bundle.onnx] [--duration 10]

1. offline: the ONNX Runtime engine alone at several batch sizes, in two
   arrangements (one all-core session; one single-thread run per core): the
   best of these is the reference configuration;
2. photoz served on 127.0.0.1, driven by wrk (one client thread, so the load
   generator does not eat the server's cores) at 1, 8, 32 and 128 connections
   posting single cutouts, and with requests of 256 cutouts (``.npy`` to
   ``/v1/predict``, and binary tensors to the Open Inference Protocol's
   ``/v2/models/{name}/infer``, every output back as binary, as tritonclient
   does by default) from two connections of :mod:`benchmarks.loadgen`, which
   counts answers by when they arrive (wrk would drop the requests in flight
   when it stops: ~4% of a 256-cutout run);
3. the same bundle served by LitServe with its own dynamic batching, same load.

Every load point is bracketed by a run of the engine offline in the reference
configuration just before and just after it, and its ratio is taken to the
better of the two: these shared machines drift by 10-20% within minutes, so a
reference measured minutes away says more about the machine than the server.

Prints a table (throughput in cutouts/s, p50/p95/p99 latency, mean batch
size, ratio to offline) and writes JSON to benchmarks/results/. Without
--model it exports a random-weight pasquet2019_half bundle (throughput does
not depend on the weights).

On a GPU host: ``python -m benchmarks.serve --device cuda --model bundle.onnx``:
the offline engine with the CUDA provider (batch 1 to 1,024, one or two
feeding threads), photoz and LitServe with the same provider, max batch 256,
wrk with 4 threads at 1, 64, 256 and 1,024 connections; the JSON
(``serve-gpu-*.json``) names the GPU (``device``) and carries
``offline_best_cutouts_per_s`` and every row's ``ratio_to_offline``.
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

from benchmarks import loadgen  # noqa: E402
from photoz.service.live import LiveServer, free_port  # noqa: E402

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
if os.getenv("EXTRA_HEADER") then
  local name, value = os.getenv("EXTRA_HEADER"):match("^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end
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


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for a benchmark's bundle, request bodies and server logs, removed when the process
    exits (the benchmarks' errors carry the server's log text)."""
    import atexit
    import shutil

    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds of a /proc ``stat`` file (a process's or one of its threads'); 0 once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants (the worker processes), seconds."""
    return sum(stat_cpu_seconds(Path(f"/proc/{p}/stat")) for p in process_tree(pid))


def export_random_bundle(path: Path) -> Path:
    import torch

    from photoz.model.network.export import export_bundle, make_metadata, untrained_record
    from photoz.model.network.pasquet import build

    torch.manual_seed(0)
    net = build("pasquet2019_half").eval()
    export_bundle(net, path, make_metadata(net, "pasquet2019_half", "benchmark-random", "0", untrained_record()))
    return path


#: (runs in parallel, threads per run) of the engine offline; 0: one per core. On a GPU: one or two host threads
#: feeding one CUDA session (two keep the GPU busier while the other copies).
ARRANGEMENTS = {"cpu": {"1 session x all cores": (1, 0), "1 thread per core": (0, 1)},
                "cuda": {"1 thread": (1, 0), "2 threads": (2, 0)}}
SCAN_SIZES = {"cpu": (1, 8, 16, 32, 64), "cuda": (1, 32, 256, 512, 1024)}


class Offline:
    """The engine alone: cutouts/s for an arrangement and batch size, on distinct cutouts (no cache reuse)."""

    def __init__(self, bundle_path: Path, device: str = "cpu"):
        from photoz.model.bundle import load_bundle
        from photoz.model.runtime import OnnxPredictor

        bundle = load_bundle(bundle_path)
        self.cores = os.cpu_count() or 1
        self.arrangements = ARRANGEMENTS[device]
        if device == "cpu":
            self.predictors = {name: OnnxPredictor(bundle, providers="cpu", intra_op_threads=threads,
                                                   allow_spinning=False)
                               for name, (_, threads) in self.arrangements.items()}
        else:  # one CUDA session shared by the threads; every batch size run once before timing
            shared = OnnxPredictor(bundle, providers=device)
            self.predictors = dict.fromkeys(self.arrangements, shared)
        self.provider = next(iter(self.predictors.values())).provider
        self.images = np.random.default_rng(0).normal(0, 0.05, (max(SCAN_SIZES[device]) + 256, 5, 64, 64)) \
            .astype(np.float32)
        self.sizes = SCAN_SIZES[device]

    def measure(self, arrangement: str, n: int, seconds: float) -> float:
        import threading

        predictor = self.predictors[arrangement]
        workers = self.arrangements[arrangement][0] or self.cores
        ebv = np.zeros(n, np.float32)
        predictor.predict(self.images[:n], ebv)
        counts = [0] * workers

        def run(i):
            start, k = time.perf_counter(), i
            while time.perf_counter() - start < seconds:
                offset = (k * n) % (len(self.images) - n + 1)
                predictor.predict(self.images[offset:offset + n], ebv)
                counts[i] += n
                k += workers

        start = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)

    def scan(self, seconds: float = 1.5) -> dict:
        """{arrangement: {batch size: cutouts/s}}."""
        return {name: {n: self.measure(name, n, seconds) for n in self.sizes} for name in self.arrangements}


def device_name(device: str) -> str:
    """The GPU's name (nvidia-smi), or the CPU's cores."""
    if device != "cpu":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            if out:
                return out[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "unknown GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores"


WRK_THREADS = 1  # main() raises it on GPU hosts, whose cores the load generator may share


def wrk(url: str, body_file: Path, content_type: str, connections: int, duration: int,
        extra_header: str | None = None) -> dict:
    """wrk posting ``body_file`` (and ``extra_header``, "Name: value", if given); its summary as a dict."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT)
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type,
           **({"EXTRA_HEADER": extra_header} if extra_header else {})}
    threads = max(1, min(WRK_THREADS, connections))
    result = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
                             "-s", fh.name, url], capture_output=True, text=True, env=env, check=True)
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


def machine_cpu() -> tuple[float, float]:
    """This machine's busy and stolen CPU seconds so far, all cores (/proc/stat): a phase's busy cores beyond the
    server's and the client's are other processes; stolen time is the hypervisor's (both make rounds differ)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def run_load(name, url, body_file, content_type, connections, duration, cutouts_per_request, metrics_url=None,
             extra_header=None):
    """One load point. Single cutouts: wrk. Large requests: :mod:`benchmarks.loadgen`, which counts answers by
    when they arrive after a settling time: wrk drops the requests in flight when it stops, on average half a
    request per connection (two connections of 256-cutout requests over 24 s: ~4% of the throughput)."""
    before = batch_counts(metrics_url) if metrics_url else None
    busy, steal, wall = *machine_cpu(), time.monotonic()
    if cutouts_per_request == 1:
        stats = wrk(url, body_file, content_type, connections, duration, extra_header)
        answered = stats["requests"] - stats["non2xx"]  # throughput counts answers with PDFs, not refusals (429)
        seconds = stats["duration_us"] / 1e6
        row = {"requests": stats["requests"], "errors": stats["socket_errors"] + stats["non2xx"],
               "non2xx": stats["non2xx"], "p50_ms": stats["p50_us"] / 1e3, "p95_ms": stats["p95_us"] / 1e3,
               "p99_ms": stats["p99_us"] / 1e3, "load_generator": f"wrk -t{max(1, min(WRK_THREADS, connections))}"}
    else:
        parsed = httpx.URL(url)
        settle = max(2.0, duration / 6)  # longer than a request takes: the counting starts in the steady state
        proc = loadgen.start(parsed.port, parsed.raw_path.decode(), body_file, connections, duration, settle,
                             content_type, (extra_header,) if extra_header else ())
        stats = loadgen.result(proc)
        seconds = duration
        requests = sum(stats["status"].values())
        answered = stats["status"].get(200, 0)
        if stats["ok_per_s_between_answers"]:  # not quantised to whole requests (4% steps at 256 cutouts)
            answered = stats["ok_per_s_between_answers"] * seconds
        row = {"requests": requests, "errors": stats["errors"] + requests - stats["status"].get(200, 0),
               "non2xx": requests - stats["status"].get(200, 0),
               "p50_ms": stats["ok_p50_ms"], "p95_ms": stats["ok_p95_ms"], "p99_ms": stats["ok_p99_ms"],
               "load_generator": f"benchmarks.loadgen, {settle:g} s settling, rate between answers"}
    busy_after, steal_after = machine_cpu()
    wall = time.monotonic() - wall
    row = {"server": name, "connections": connections, "cutouts_per_request": cutouts_per_request,
           "cutouts_per_s": answered * cutouts_per_request / seconds, **row,
           "machine_busy_cores": (busy_after - busy) / wall, "stolen_cores": (steal_after - steal) / wall}
    if metrics_url:
        after = batch_counts(metrics_url)
        row["mean_batch_size"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return row


def oip_binary_body(images: np.ndarray, path: Path) -> str:
    """An Open Inference Protocol request as tritonclient sends it (binary images, every output back as binary)
    written to ``path``; returns the header that goes with it."""
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                   "parameters": {"binary_data_size": images.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    path.write_bytes(head + np.ascontiguousarray(images, "<f4").tobytes())
    return f"Inference-Header-Content-Length: {len(head)}"


def stop_group(proc: subprocess.Popen) -> None:
    """Stop LitServe and the worker processes it spawned."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_litserve(bundle: Path, max_batch_size: int, log: Path, providers: str = "cpu") -> \
        tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.litserve_peer", "--model", str(bundle),
                             "--port", str(port), "--max-batch-size", str(max_batch_size),
                             "--providers", providers], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the child's)
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_group(proc)
    raise RuntimeError(f"LitServe did not start (pip install -e '.[bench]'):\n{log.read_text()}")


def serve_photoz(bundle: Path, work: Path, args: argparse.Namespace, workers: int, conns: list[int], bracketed,
                 oip_header: str) -> list[dict]:
    """photoz with ``workers`` processes: single cutouts at each of ``conns``, then requests of 256 cutouts."""
    rows = []
    server = LiveServer(bundle, work / f"photoz-{workers}.log", **{
        "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
        "max_queue_objects": 100000, "providers": args.device, "log_level": "warning", "workers": workers,
        **dict(flag.split("=", 1) for flag in args.server_flag)})
    try:
        for c in conns:
            print(f"photoz ({workers} worker(s)), {c} connections ...", flush=True)
            rows.append(bracketed(lambda c=c: run_load("photoz", server.url + "/v1/predict", work / "single.npy",
                                                       "application/x-npy", c, args.duration, 1, server.url)))
        name = httpx.get(server.url + "/v1/models").json()["models"][0]["name"]
        for round_ in range(args.rounds_256):  # alternating, so drift hits both alike
            print(f"photoz, requests of 256 cutouts (.npy to /v1/predict), round {round_ + 1} ...", flush=True)
            # long enough for many 256-cutout requests (each takes about a second)
            rows.append(bracketed(lambda: run_load("photoz", server.url + "/v1/predict", work / "batch256.npy",
                                                   "application/x-npy", 2, 3 * args.duration, 256, server.url)))
            print(f"photoz, Open Inference Protocol, binary requests of 256 cutouts, round {round_ + 1} ...",
                  flush=True)
            rows.append(bracketed(lambda: run_load("photoz-oip", f"{server.url}/v2/models/{name}/infer",
                                                   work / "batch256.oip", "application/octet-stream", 2,
                                                   3 * args.duration, 256, server.url, oip_header)))
    finally:
        server.stop()
    return [{**row, "workers": workers} for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="bundle (default: a random-weight pasquet2019_half)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load point")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: ONNX Runtime's CUDA provider for photoz, LitServe and the offline engine; "
                             "results as serve-gpu-*.json")
    parser.add_argument("--connections", default=None, help="default: 1,8,32,128 (cpu) or 1,64,256,1024 (cuda)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: 8 (cpu) or 256 (cuda)")
    parser.add_argument("--wrk-threads", type=int, default=None, help="default: 1 (cpu) or 4 (cuda)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--offline-seconds", type=float, default=4.0,
                        help="engine-alone run before and after each load point")
    parser.add_argument("--scan-seconds", type=float, default=1.5,
                        help="per arrangement and batch size in the offline engine's scan")
    parser.add_argument("--rounds-256", type=int, default=1,
                        help="alternating rounds of 256-cutout requests, /v1 .npy then /v2 binary")
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument("--workers", default="1", help="photoz worker process counts (PHOTOZ_WORKERS) to run, "
                                                      "comma list, each in turn")
    parser.add_argument("--server-flag", action="append", default=[], metavar="NAME=VALUE",
                        help="extra photoz serve flag, e.g. max_bulk_batch_size=8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    gpu = args.device != "cpu"
    args.connections = args.connections or ("1,64,256,1024" if gpu else "1,8,32,128")
    args.max_batch_size = args.max_batch_size or (256 if gpu else 8)
    global WRK_THREADS
    WRK_THREADS = args.wrk_threads or (4 if gpu else 1)
    conns = [int(c) for c in args.connections.split(",")]
    work = scratch_dir("photoz-bench-")
    bundle = args.model or export_random_bundle(work / "bench.onnx")

    rng = np.random.default_rng(1)
    single = rng.normal(0, 0.05, (5, 64, 64)).astype(np.float32)
    many = rng.normal(0, 0.05, (256, 5, 64, 64)).astype(np.float32)
    for name, array in (("single.npy", single), ("batch256.npy", many)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        (work / name).write_bytes(buffer.getvalue())
    oip_header = oip_binary_body(many, work / "batch256.oip")
    single_b64 = base64.b64encode((work / "single.npy").read_bytes()).decode()
    (work / "single.json").write_text(json.dumps({"npy": single_b64}))

    offline = Offline(bundle, args.device)
    print(f"offline engine throughput (ONNX Runtime, {offline.provider}), scanning arrangements and batch sizes ...",
          flush=True)
    scan = offline.scan(args.scan_seconds)
    best_arrangement, best_size = max(((a, n) for a in scan for n in scan[a]), key=lambda k: scan[k[0]][k[1]])
    print(f"reference: {best_arrangement}, batch {best_size}", flush=True)

    def bracketed(run):
        before = offline.measure(best_arrangement, best_size, args.offline_seconds)
        row = run()
        after = offline.measure(best_arrangement, best_size, args.offline_seconds)
        row.update(offline_before=before, offline_after=after,
                   ratio_to_offline=row["cutouts_per_s"] / max(before, after))
        print(f"  {row['cutouts_per_s']:.0f} cutouts/s, offline {before:.0f} / {after:.0f}: "
              f"x{row['ratio_to_offline']:.2f} (machine busy {row['machine_busy_cores']:.2f} cores, stolen "
              f"{row['stolen_cores']:.2f})", flush=True)
        return row

    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        rows += serve_photoz(bundle, work, args, workers, conns, bracketed, oip_header)
    litserve_error = None
    try:
        proc, url = (None, None) if args.skip_litserve else start_litserve(bundle, args.max_batch_size,
                                                                           work / "litserve.log", args.device)
    except (TimeoutError, RuntimeError) as exc:  # reported, and the rows measured so far are kept
        litserve_error = str(exc).splitlines()[-1]
        print(f"LitServe skipped: {litserve_error}", flush=True)
        proc = None
    if proc is not None:
        try:
            for c in conns:
                print(f"LitServe, {c} connections ...", flush=True)
                rows.append(bracketed(lambda c=c: run_load("litserve", url + "/predict", work / "single.json",
                                                           "application/json", c, args.duration, 1)))
        finally:
            stop_group(proc)

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": device_name(args.device),
              "provider": offline.provider, "bundle": str(bundle),
              "offline_cutouts_per_s": scan, "offline_best_batch_size": best_size,
              "offline_best_arrangement": best_arrangement, "offline_best": scan[best_arrangement][best_size],
              **({"litserve_error": litserve_error} if litserve_error else {}),
              "settings": {"server_flags": args.server_flag,
                           "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                           "duration_s": args.duration, "offline_seconds": args.offline_seconds,
                           "load_generator": f"wrk -t{WRK_THREADS} (single cutouts), benchmarks.loadgen "
                                             "(256-cutout requests)"}, "rows": rows}
    report["offline_best_cutouts_per_s"] = report["offline_best"]
    report["photoz_over_litserve"] = over_litserve(rows)
    if "32" in report["photoz_over_litserve"]:  # the CPU target's connection count, kept under its own key
        report["photoz_over_litserve_at_32"] = report["photoz_over_litserve"]["32"]
    v1_256 = [r for r in rows if r["server"] == "photoz" and r["cutouts_per_request"] == 256 and r["workers"] == 1]
    oip_256 = [r for r in rows if r["server"] == "photoz-oip" and r["workers"] == 1]
    if v1_256 and oip_256:  # each to its own bracketing offline runs, summed over the rounds: drift cancels
        report["oip_binary_over_v1_npy_at_256"] = (sum(r["ratio_to_offline"] for r in oip_256)
                                                   / sum(r["ratio_to_offline"] for r in v1_256))
    report["targets"] = targets(report, gpu)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serve-{'gpu-' if gpu else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"\nwrote {out}")
    return 0


def over_litserve(rows: list[dict]) -> dict[str, float]:
    """photoz's single-cutout cutouts/s over LitServe's at each connection count both ran (one photoz worker
    and, where more were run, the best worker count: ``"256"``, ``"256, 4 workers"``)."""
    lit = {r["connections"]: r["cutouts_per_s"] for r in rows if r["server"] == "litserve" and r["cutouts_per_s"] > 0}
    single = [r for r in rows if r["server"] == "photoz" and r["cutouts_per_request"] == 1 and r["connections"] in lit]
    ratios = {}
    for c in sorted({r["connections"] for r in single}):
        at = [r for r in single if r["connections"] == c]
        one = next((r for r in at if r.get("workers", 1) == 1), None)
        if one:
            ratios[str(c)] = one["cutouts_per_s"] / lit[c]
        best = max(at, key=lambda r: r["cutouts_per_s"])
        if best.get("workers", 1) != 1:
            ratios[f"{c}, {best['workers']} workers"] = best["cutouts_per_s"] / lit[c]
    return ratios


def format_table(report: dict) -> str:
    lines = [f"offline engine, {name}: " + ", ".join(f"batch {k}: {v:.0f}/s" for k, v in sizes.items())
             for name, sizes in report["offline_cutouts_per_s"].items()]
    lines += [f"reference: the engine offline, {report['offline_best_arrangement']}, batch "
              f"{report['offline_best_batch_size']} ({report['offline_best']:.0f} cutouts/s in the scan), "
              "run before and after each load point", "",
              "| server | connections | cutouts/request | cutouts/s | offline before / after | x offline | p50 ms "
              "| p95 ms | p99 ms | mean batch | errors |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        batch = f"{r['mean_batch_size']:.1f}" if "mean_batch_size" in r else "-"
        server = r["server"] + (f" ({r['workers']} workers)" if r.get("workers", 1) > 1 else "")
        lines.append(f"| {server} | {r['connections']} | {r['cutouts_per_request']} | {r['cutouts_per_s']:.0f} | "
                     f"{r['offline_before']:.0f} / {r['offline_after']:.0f} | {r['ratio_to_offline']:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {batch} | {r['errors']} |")
    if report.get("photoz_over_litserve"):
        lines.append("\nphotoz / LitServe, single cutouts, by connections: " + ", ".join(
            f"{k}: {v:.2f}" for k, v in report["photoz_over_litserve"].items()))
    if "oip_binary_over_v1_npy_at_256" in report:
        lines.append("Open Inference Protocol (binary tensors) / /v1/predict (.npy), 256-cutout requests, each as a "
                     f"ratio to its own offline runs: {report['oip_binary_over_v1_npy_at_256']:.2f}")
    if report.get("targets"):
        lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]]
    return "\n".join(lines)


def targets(report: dict, gpu: bool) -> list[dict]:
    """The serving targets this run can judge (issue 28's; a GPU host's or a CPU host's), each with what was
    measured (one worker, unless a target is about more) and whether it is met; a target whose load point was
    not run is left out."""
    rows, out = report["rows"], []

    def photoz(connections: int, per_request: int, workers: int | None = 1) -> list[dict]:
        return [r for r in rows if r["server"] in ("photoz", "photoz-oip") and r["connections"] == connections
                and r["cutouts_per_request"] == per_request and (workers is None or r.get("workers", 1) == workers)]

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"target": target, "measured": measured, "met": bool(met)})

    if bulk := [r for r in rows if r["server"].startswith("photoz") and r["cutouts_per_request"] == 256
                and r.get("workers", 1) == 1]:
        floor = 0.8 if gpu else 0.95
        worst = min(r["ratio_to_offline"] for r in bulk)
        add(f"256-cutout requests >= {floor} x the engine offline at its best", f"{worst:.2f} (worst round)",
            worst >= floor)
    if gpu:
        if at := photoz(256, 1, None):
            best = max(at, key=lambda r: r["cutouts_per_s"])
            add("single cutouts at 256 connections >= 10,000/s, p99 <= 100 ms",
                f"{best['cutouts_per_s']:,.0f}/s, p99 {best['p99_ms']:.0f} ms ({best.get('workers', 1)} workers)",
                best["cutouts_per_s"] >= 10_000 and best["p99_ms"] <= 100)
        if lone := photoz(1, 1):
            add("a lone request p50 <= 5 ms", f"{lone[0]['p50_ms']:.1f} ms", lone[0]["p50_ms"] <= 5)
    elif at := photoz(32, 1):
        add("single cutouts at 32 connections >= 0.9 x offline", f"{at[0]['ratio_to_offline']:.2f}",
            at[0]["ratio_to_offline"] >= 0.9)
    if ratios := report.get("photoz_over_litserve"):
        key = "32" if "32" in ratios and not gpu else max(ratios, key=ratios.get)
        add("photoz >= 1.5 x LitServe on the same engine", f"{ratios[key]:.2f} (at {key} connections)",
            ratios[key] >= 1.5)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
