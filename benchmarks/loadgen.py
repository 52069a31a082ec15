"""A closed-loop HTTP load generator that counts answers by when they arrive.

    python -m benchmarks.loadgen PORT PATH BODY_FILE CONNECTIONS SECONDS [--settle S]
        [--content-type T] [--header "Name: value"]

``CONNECTIONS`` clients each post ``BODY_FILE`` to ``PATH`` on 127.0.0.1, one
request at a time, again at once after every answer (and reconnect at once
when the server closes the connection: a client that ignores Retry-After).
Load runs for ``settle`` + ``SECONDS``; an answer counts when it *arrives*
within the last ``SECONDS``, and the requests still in flight at the end are
dropped. That is the rate a long run would see: a counter of requests that
were both sent and answered inside the window (wrk's, and this module's
predecessor's) loses the requests in flight at its edges, on average half a
request per connection at the end (and at the start, the pipeline's fill),
which for two connections posting 256 cutouts over 24 s is about 4% of the
throughput. Its successes per second come two ways: counted in the window
(``ok_per_s``), and from the time between the first and last success in it
(``ok_per_s_between_answers``, successes less one over that time), which is
not quantised: two connections of 256-cutout requests answer ~24 in 24 s,
so a count moves in steps of 4%. Prints one JSON line (statuses, latency
percentiles of the successes, errors, the client's CPU seconds). Raw
sockets, one pre-encoded request, uvloop when installed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def encode_request(path: str, body: bytes, content_type: str, headers: tuple[str, ...] = ()) -> bytes:
    """One HTTP/1.1 POST, headers and body, as sent on the wire."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers.get("connection", "").lower() == "close"


async def _connection(port: int, request: bytes, counting_from: float, stats: dict) -> None:
    reader = writer = None
    try:
        while True:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
                start = time.monotonic()
                status, close = await _exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                stats["errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.001)
                continue
            done = time.monotonic()
            if done >= counting_from:  # answered inside the window (the window's end cancels this task)
                stats["status"][status] = stats["status"].get(status, 0) + 1
                if status == 200:
                    stats["ok_latency"].append(done - start)
                    stats["ok_times"].append(done)
            if close:  # Retry-After ignored: reconnect and send again at once
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def run(port: int, request: bytes, connections: int, seconds: float, settle_s: float = 0.0) -> dict:
    """Drive the server for ``settle_s`` + ``seconds``; count what arrives in the last ``seconds``."""
    stats: dict = {"status": {}, "ok_latency": [], "ok_times": [], "errors": 0}

    async def main() -> None:
        counting_from = time.monotonic() + settle_s
        tasks = [asyncio.ensure_future(_connection(port, request, counting_from, stats)) for _ in range(connections)]
        await asyncio.sleep(settle_s + seconds)
        for task in tasks:  # the window is over: what is still in flight is not counted
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    latency = np.array(stats["ok_latency"]) * 1000
    percentiles = {f"ok_p{q}_ms": float(np.percentile(latency, q)) if latency.size else None for q in (50, 95, 99)}
    times = sorted(stats["ok_times"])
    return {"status": stats["status"], "errors": stats["errors"], "seconds": seconds, "settle_s": settle_s,
            "client_cpu_s": time.process_time(), **percentiles, "ok_per_s": len(times) / seconds,
            "ok_per_s_between_answers": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else None}


def start(port: int, path: str, body_file: Path, connections: int, seconds: float, settle_s: float = 0.0,
          content_type: str = "application/x-npy", headers: tuple[str, ...] = ()) -> subprocess.Popen:
    """The generator in its own process (it must not share the caller's GIL); :func:`result` reads its answer."""
    command = [sys.executable, "-m", "benchmarks.loadgen", str(port), path, str(body_file), str(connections),
               str(seconds), "--settle", str(settle_s), "--content-type", content_type]
    for header in headers:
        command += ["--header", header]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def result(proc: subprocess.Popen) -> dict:
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    out = json.loads(stdout.strip().splitlines()[-1])
    out["status"] = {int(k): v for k, v in out["status"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("body_file", type=Path)
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--settle", type=float, default=0.0, help="seconds of load before counting starts")
    parser.add_argument("--content-type", default="application/x-npy")
    parser.add_argument("--header", action="append", default=[], help='"Name: value", repeatable')
    args = parser.parse_args(argv)
    request = encode_request(args.path, args.body_file.read_bytes(), args.content_type, tuple(args.header))
    print(json.dumps(run(args.port, request, args.connections, args.seconds, args.settle)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
