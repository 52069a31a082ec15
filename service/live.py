"""A real ``photoz serve`` process on 127.0.0.1, for tests, benchmarks and pipelines' own integration tests.

    from photoz.service.live import LiveServer

    server = LiveServer("model.onnx", "server.log", max_batch_size=8)
    ...  # requests to server.url
    exit_code = server.stop()  # SIGTERM: the server drains, then exits

Flags are ``photoz serve`` flags with underscores (``max_batch_size=8`` ->
``--max-batch-size 8``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """``photoz serve`` in a subprocess: ``url``, ``log()`` and ``stop()`` (SIGTERM, returns the exit code).

    Parameters
    ----------
    model : path
        The model bundle (.onnx) to serve.
    log_path : path
        File that receives the server's stdout and stderr.
    env : dict, optional
        Extra environment variables (``PHOTOZ_*`` settings, for example).
    ready_timeout_s : float
        How long to wait for ``/readyz`` to answer 200, seconds.
    **flags
        ``photoz serve`` flags, underscores for dashes.
    """

    def __init__(self, model: str | Path, log_path: str | Path, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 60.0, **flags: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        args = [sys.executable, "-m", "photoz", "serve", "--model", str(model), "--port", str(self.port)]
        for name, value in flags.items():
            flag = name.replace("_", "-")
            args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
        self._log: IO[str] = open(self.log_path, "w")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/readyz`` answers 200; raise with the server's log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_queued(self, n: int, timeout: float = 60.0) -> None:
        """Block until the server's queue holds ``n`` cutouts (``photoz_queue_depth`` in /metrics, one worker);
        raise with its log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"photoz_queue_depth {float(n)}" in httpx.get(self.url + "/metrics", timeout=5).text:
                return
            time.sleep(0.01)
        raise TimeoutError(f"the queue never held {n} cutouts in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server has printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful drain), SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
