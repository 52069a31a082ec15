"""Several worker processes on one port: ``PHOTOZ_WORKERS``.

One Python process answers at most ~1,000-2,000 single-cutout requests per
second, whatever the accelerator; a GPU engine runs tens of thousands of
cutouts per second. The supervisor here binds the port once and starts
``workers`` processes that all accept on that socket (the kernel hands each
connection to a worker whose event loop is free to take it). Each worker is a
whole photoz server with its own engine (on a GPU, its own CUDA context and
sessions): nothing is shared at run time but the socket and the metrics
directory, so a worker that dies takes only its own requests with it.

- Limits are divided: each worker's queue holds ``max_queue_objects / workers``
  cutouts, reads ``max_inflight_body_mb / workers`` of bodies at once and
  answers ``max_refusals_per_s / workers`` held 429s a second, with
  ``flag_workers / workers`` flag threads (rounded up), and on a CPU host
  ``inference_workers / workers`` concurrent batches, so the server as a whole
  holds what the settings say; admission (429 with
  Retry-After, the queue-wait target, early refusal from the headers) is each
  worker's over its own queue, which is what its latency depends on.
- Connections are balanced: a worker accepts a waiting connection only while
  it has no more open connections than the least loaded worker (every
  worker's count lives in shared memory, :class:`Listener`), so a client with
  as many connections as there are workers reaches them all. Left to the
  kernel, two 256-cutout clients on two workers landed in one worker in three
  of six rounds and ran at its rate, half the server's. A worker whose event
  loop is busy is passed over after :data:`MAX_DEFER_S`. The first workers
  start accepting together, once all are ready.
- ``/metrics`` is one view of every worker (Prometheus' multiprocess mode:
  each process writes its samples to files in one directory, any worker
  renders them all); the queue gauges carry a ``pid`` label per worker.
- SIGTERM (or SIGINT) is passed to every worker, which drains as a single
  server does (readyz 503, queued work finished, nothing accepted is lost);
  the supervisor exits when they all have.
- A worker that dies (SIGKILL, out of memory) is replaced; the others carry
  on. Workers that die right after starting, again and again (a bundle that
  does not load), stop the server instead of looping.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import cast

from photoz.service.settings import Settings

log = logging.getLogger("photoz.service")

#: The environment variable Prometheus' client reads at import for its multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: A worker that exits sooner than this after its start, this many times in a row, stops the server.
QUICK_DEATH_S, QUICK_DEATHS = 20.0, 3
#: How often the supervisor looks at its workers, seconds.
POLL_S = 0.2
#: The connection count of a worker that is not accepting (starting, draining or dead): never the least loaded.
NOT_ACCEPTING = 2**62
#: A worker with more connections than the least loaded one looks at a waiting connection again after this many
#: seconds (leaving it to that worker) ...
DEFER_S = 0.001
#: ... and accepts it itself once it has waited this long: the least loaded worker's event loop may be busy.
MAX_DEFER_S = 0.02
#: How long the first workers wait for each other to be ready before accepting without the slow ones, seconds.
STARTUP_WAIT_S = 120.0
#: Connections accepted at most per wake-up of the event loop (as asyncio's own accept loop does per backlog).
ACCEPTS_PER_WAKE = 64


def worker_settings(settings: Settings, workers: int, gpu: bool = False) -> Settings:
    """One worker's settings: the server's limits divided among ``workers``, and its share of the cores (unless
    the ORT threads are set). On a CPU host the concurrent batches are divided too: every batch's threads take
    cores from the others, and two workers with two batches each on two cores had 3x the p99 of one batch each
    under a retry storm (``benchmarks.overload``); on a GPU host each worker keeps its batches in flight."""
    cores = os.cpu_count() or 1
    share = max(1, cores // workers)
    batches = settings.inference_workers if gpu else max(1, settings.inference_workers // workers)
    return settings.model_copy(update={
        "inference_workers": batches,
        "workers": 1,
        "max_queue_objects": max(1, settings.max_queue_objects // workers),
        "max_inflight_body_mb": settings.max_inflight_body_mb / workers,
        "max_refusals_per_s": settings.max_refusals_per_s / workers,
        "flag_workers": -(-settings.flag_workers // workers),  # the flags' threads shared too (rounded up)
        "intra_op_threads": settings.intra_op_threads or max(1, share // batches),
        "solo_threads": settings.solo_threads or share,
    })


def bind(settings: Settings) -> socket.socket:
    """The listening socket every worker accepts on (bound before any worker starts: a port in use fails here)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class Listener:
    """Where worker ``index`` accepts: the socket every worker shares, and every worker's count of open connections
    (shared memory, :data:`NOT_ACCEPTING` for a worker that does not accept)."""

    sock: socket.socket
    counts: MutableSequence[int]
    index: int
    #: the first workers wait here for each other (at most STARTUP_WAIT_S) before accepting, so the connections a
    #: client opens as soon as the server answers are shared by all of them; a replacement has none
    started_together: threading.Barrier | None = None


def should_accept(counts: MutableSequence[int], index: int, deferred_since: float | None, now: float) -> bool:
    """Whether worker ``index`` takes a waiting connection now: while it has no more open connections than any
    accepting worker, or once it has left the connection to a less loaded one for :data:`MAX_DEFER_S`."""
    mine = counts[index]
    if all(mine <= count for count in counts):
        return True
    return deferred_since is not None and now - deferred_since >= MAX_DEFER_S


class BalancedAcceptor:
    """Accepts connections on a worker's :class:`Listener` by :func:`should_accept` and hands each to
    ``protocol_factory``'s protocol on the running event loop (``loop.connect_accepted_socket``). The protocol
    calls :meth:`closed` when its connection is lost."""

    def __init__(self, listener: Listener, clock: Callable[[], float] = time.monotonic) -> None:
        self.listener, self.clock = listener, clock
        self.open = 0
        self.accepting = False
        self.deferred_since: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.protocol_factory: Callable[[], asyncio.Protocol] | None = None
        self.retry: asyncio.TimerHandle | None = None

    async def start(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop, self.protocol_factory = asyncio.get_running_loop(), protocol_factory
        if self.listener.started_together is not None:
            try:
                await asyncio.to_thread(self.listener.started_together.wait, STARTUP_WAIT_S)
            except threading.BrokenBarrierError:
                log.warning("not every worker was ready within %.0f s: accepting without them", STARTUP_WAIT_S)
        self.listener.sock.setblocking(False)
        self.accepting = True
        self._publish()
        self.loop.add_reader(self.listener.sock.fileno(), self._on_readable)
        log.info("worker %d accepting connections", self.listener.index)

    def stop(self) -> None:
        """Accept nothing more (a drain): the other workers take the waiting connections."""
        if self.accepting and self.loop is not None:
            self.accepting = False
            self.loop.remove_reader(self.listener.sock.fileno())
            if self.retry is not None:
                self.retry.cancel()
        self._publish()

    def closed(self) -> None:
        self.open = max(0, self.open - 1)
        self._publish()

    def _publish(self) -> None:
        self.listener.counts[self.listener.index] = self.open if self.accepting else NOT_ACCEPTING

    def _pause(self, seconds: float) -> None:
        """Stop looking at the socket for ``seconds`` (it stays readable while a connection waits)."""
        assert self.loop is not None
        self.loop.remove_reader(self.listener.sock.fileno())
        self.retry = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.retry = None
        if self.accepting and self.loop is not None:
            if not select.select([self.listener.sock], [], [], 0)[0]:
                self.deferred_since = None  # the connection it left went to another worker: a new deferral next
            self.loop.add_reader(self.listener.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self.loop is not None and self.protocol_factory is not None
        for _ in range(ACCEPTS_PER_WAKE):
            now = self.clock()
            if not should_accept(self.listener.counts, self.listener.index, self.deferred_since, now):
                self.deferred_since = self.deferred_since if self.deferred_since is not None else now
                self._pause(DEFER_S)
                return
            self.deferred_since = None
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # another worker took it, or the client gave up
            except OSError as exc:  # out of file descriptors or buffers: wait as asyncio's own accept loop does
                log.error("accepting a connection failed (%s): pausing accept for 1 s", exc)
                self._pause(1.0)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.open += 1
            self._publish()
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        assert self.loop is not None and self.protocol_factory is not None
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the connection is gone before its protocol had it
            log.debug("a connection accepted could not start: %s", exc)
            conn.close()
            self.closed()


class Supervisor:
    """Starts ``workers`` processes running ``target(settings, listener)``, replaces those that die, and stops them
    all on SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, workers: int, target: Callable[[Settings, Listener], None]) -> None:
        self.settings, self.workers, self.target = settings, workers, target
        self.context = multiprocessing.get_context("spawn")
        self.counts = cast(MutableSequence[int], self.context.RawArray(ctypes.c_int64, [NOT_ACCEPTING] * workers))
        self.started_together = self.context.Barrier(workers)
        self.processes: dict[int, BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.stopping = False
        self.quick_deaths = 0

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="photoz-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers before they import prometheus_client
        sock = bind(self.settings)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("serving http://%s:%d with %d worker processes (PHOTOZ_WORKERS; each its own engine, queue "
                 "limit %d cutouts, %d batches at a time)", self.settings.host, sock.getsockname()[1], self.workers,
                 self.settings.max_queue_objects, self.settings.inference_workers)
        try:
            for index in range(self.workers):
                self._start(index, sock)
            failed = self._watch(sock)
            return self._wait_for_workers() or failed
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start(self, index: int, sock: socket.socket) -> None:
        self.counts[index] = NOT_ACCEPTING  # until it accepts (a dead worker's count went with it)
        first = index not in self.processes  # the first workers start together; a replacement joins at once
        listener = Listener(sock, self.counts, index, self.started_together if first else None)
        process = self.context.Process(target=self.target, args=(self.settings, listener),
                                       name=f"photoz-worker-{index}")
        process.start()
        self.processes[index], self.started[index] = process, time.monotonic()

    def _watch(self, sock: socket.socket) -> int:
        """Until asked to stop: replace workers that die; 1 if they keep dying at start-up."""
        from prometheus_client import multiprocess

        while not self.stopping:
            time.sleep(POLL_S)
            for index, process in list(self.processes.items()):
                if process.is_alive() or self.stopping:
                    continue
                lived = time.monotonic() - self.started[index]
                log.warning("worker %d (pid %s) exited with %s after %.1f s: replacing it", index, process.pid,
                            process.exitcode, lived)
                self.counts[index] = NOT_ACCEPTING
                self.started_together.abort()  # the others accept now, not after STARTUP_WAIT_S (once started: no-op)
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                self.quick_deaths = self.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
                if self.quick_deaths >= QUICK_DEATHS:
                    log.error("workers keep exiting at start-up (%d in a row): stopping", self.quick_deaths)
                    self._stop(signal.SIGTERM, None)
                    return 1
                self._start(index, sock)
        return 0

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("signal %s: draining %d workers", sig, len(self.processes))
        self.stopping = True
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def _wait_for_workers(self) -> int:
        """Wait for every worker's drain (then kill what is left); 0 if every one exited cleanly."""
        deadline = time.monotonic() + self.settings.drain_timeout_s + 15
        for process in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not drain in time: killing it", process.pid)
                process.kill()
                process.join()
        return 0 if all(p.exitcode == 0 for p in self.processes.values()) else 1
