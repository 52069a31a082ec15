# over 400 lines: one Batcher, whose queue, model threads and finishing stage share invariants best read together
"""Dynamic batching: many requests' cutouts, few model calls.

Requests are cut into pieces of at most ``max_batch_size`` cutouts and
queued. A single loop forms a batch when it holds ``max_batch_size``
cutouts or when the oldest waiting piece has waited ``max_queue_delay``
(unless requests come one at a time: an idle engine whose last batch
held one request's cutouts alone takes what is queued at once),
runs it off the event loop, and hands each piece its rows. A batch of
pieces of large requests only (more than ``max_batch_size`` cutouts each)
may grow to ``max_bulk_batch_size``: bulk work gets the engine's better
rate at larger batches, while small requests keep small batches and their
latency (a small piece never joins a bulk batch, nor a bulk piece beyond
``max_batch_size`` a small one's). While a batch
runs, the next one accumulates, so a busy server forms full batches. Under
light load (a batch runs alone and nothing waits) the optional
``infer_alone`` engine runs it instead: on a CPU, one using every core, so
a lone request is not held to its share of the cores. An optional
``finish`` stage (the cutouts' quality flags) runs on its own threads after
the model call, so the next batch's model call does not wait for it (a GPU
would otherwise idle through CPU work); the batches waiting for it are
finished together, in one call (its fixed cost paid once), and at most
four per finishing thread wait, beyond which the model waits. The
queue is bounded (in cutouts): a request that does not fit is refused at
once. Pieces whose caller gave up (deadline passed, client gone) are
dropped before they reach the model. A model call (or finishing stage) that
raises is bisected (:func:`photoz.model.isolation.isolate`): the cutouts that
fail alone come back with their error under ``row_errors``, everyone else's
answers as usual; only a failure of every cutout, with a healthy probe call
failing too, fails the whole batch.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from photoz.formats.errors import InputError
from photoz.model.isolation import Isolation, Outputs, concatenate_outputs, isolate, isolate_batch
from photoz.service.errors import DeadlineExceeded, Draining, QueueFull

log = logging.getLogger("photoz.service")

#: Batches per finishing thread that may wait for it (the model runs ahead by that much, then waits).
FINISH_BACKLOG_BATCHES = 4
#: Cutouts finished in one call at most, when several waiting batches are joined (a GPU's batch may be larger).
FINISH_COALESCE_OBJECTS = 64
#: The largest burst admitted, in multiples of the queue-wait target: work that starts within this drains to the
#: target within the 2 x target a queue may stay above it before it counts as standing (see Batcher.admission).
BURST_TARGETS = 3


@dataclass
class _Piece:
    images: np.ndarray
    ebv: np.ndarray
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float
    request_id: str = ""
    started: float = field(default=0.0)
    bulk: bool = False  # a piece of a request larger than max_batch_size: may share a bulk batch

    @property
    def n(self) -> int:
        return self.images.shape[0]


@dataclass
class _FinishJob:
    """A batch the model has answered, waiting for the finishing stage."""

    batch: list[_Piece]
    images: np.ndarray
    ebv: np.ndarray
    outputs: dict[str, np.ndarray]
    future: asyncio.Future[dict[str, np.ndarray]]

    @property
    def n(self) -> int:
        return self.images.shape[0]


def _hand_out(waiters: list[_Piece] | list[_FinishJob], outputs: dict[str, np.ndarray]) -> None:
    """Each waiter (a queued piece, a batch waiting to be finished) its own rows of ``outputs``, in order; one
    that is done already (its caller gone, its task cancelled) is skipped."""
    offset = 0
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_result({key: value[offset:offset + waiter.n] for key, value in outputs.items()})
        offset += waiter.n


def _fail(waiters: list[_Piece] | list[_FinishJob], exc: BaseException) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_exception(exc)


def _joined(jobs: list[_FinishJob]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    if len(jobs) == 1:
        return jobs[0].images, jobs[0].ebv, jobs[0].outputs
    return (np.concatenate([j.images for j in jobs]), np.concatenate([j.ebv for j in jobs]),
            concatenate_outputs([j.outputs for j in jobs]))


@dataclass
class BatchStats:
    """Hooks the metrics module plugs into."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_queue_wait: Callable[[float], None] = lambda seconds: None
    on_depth: Callable[[int], None] = lambda depth: None
    on_isolated: Callable[[int], None] = lambda failed_objects: None  # a failed call bisected
    on_incoming: Callable[[int], None] = lambda cutouts: None  # cutouts admitted whose bodies are still read


class Batcher:
    def __init__(self, infer: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]], max_batch_size: int,
                 max_queue_delay_s: float, max_queue_objects: int, workers: int = 1,
                 stats: BatchStats | None = None,
                 infer_alone: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None,
                 max_queue_wait_s: float | None = None,
                 finish: Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                 finish_workers: int = 1, clock: Callable[[], float] = time.monotonic,
                 max_bulk_batch_size: int | None = None, wait_when_idle: bool = False):
        self.infer = infer
        # seconds, monotonic: queue delays, deadlines and the admission's standing-queue timer (tests inject one)
        self.clock = clock
        # (images, ebv, outputs) -> outputs, after the model call, on its own threads
        self.finish = finish
        # under light load (one batch running, nothing queued) a wider engine uses the idle cores
        self.infer_alone = infer_alone
        self.max_batch_size = max_batch_size
        # most cutouts in a batch of large requests' pieces only (None: max_batch_size, no bulk batches)
        self.max_bulk_batch_size = max(max_bulk_batch_size or max_batch_size, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.wait_when_idle = wait_when_idle  # False: requests coming one at a time skip the delay (see _loop)
        self.max_queue_objects = max_queue_objects
        # latency bound: refuse when the work queued ahead would take longer than this to start
        self.max_queue_wait_s = max_queue_wait_s
        self._above_since: float | None = None  # since when the queued work has exceeded the target
        self._dropping = False  # a standing queue: refusing beyond the target until the queue drains
        self.workers = workers
        self.stats = stats or BatchStats()
        self._queue: collections.deque[_Piece] = collections.deque()
        self._queued = 0
        # cutouts of requests admitted from their headers whose bodies are still being read or decoded: they
        # count against the queue, so a moment of empty queue does not let a whole storm's bodies in at once
        self.incoming = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(workers)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="photoz-infer",
                                            initializer=name_native_thread)
        self._finisher = ThreadPoolExecutor(max_workers=finish_workers, thread_name_prefix="photoz-finish",
                                            initializer=name_native_thread) if finish is not None else None
        self.finish_workers = finish_workers
        # batches finished or waiting to be, at most (the model waits beyond): those waiting are finished together
        self._finishing = asyncio.Semaphore(FINISH_BACKLOG_BATCHES * finish_workers)
        self._finish_jobs: collections.deque[_FinishJob] = collections.deque()
        self._finish_drains = 0  # finishing loops running (at most finish_workers)
        # most cutouts finished in one call: several CPU-sized batches, one GPU-sized one
        self.max_finish_objects = max(self.max_bulk_batch_size, FINISH_COALESCE_OBJECTS)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches being run (each waits for its finishing)
        self._last_pieces = 0  # pieces (requests' shares) in the last batch formed: do requests come together?
        self._drains: set[asyncio.Task[None]] = set()
        self.seconds_per_object = 0.01  # running estimate (warm-up seeds it): Retry-After, the wait target
        self.accepting = True

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._spawn_workers()
        self._task = asyncio.create_task(self._loop(), name="photoz-batcher")

    def _spawn_workers(self) -> None:
        """Start every inference thread now, from the thread that starts the batcher: threads inherit their
        creator's scheduling priority, and the event loop may lower its own afterwards (``http_nice``)."""
        barrier = threading.Barrier(self.workers)
        for future in [self._executor.submit(barrier.wait, 10) for _ in range(self.workers)]:
            future.result()

    async def submit(self, images: np.ndarray, ebv: np.ndarray, timeout_s: float,
                     request_id: str = "") -> dict[str, np.ndarray]:
        """``infer``'s row-aligned outputs for ``images``, in order (with ``row_errors`` when some cutouts failed
        alone); raises QueueFull, DeadlineExceeded, Draining. ``request_id`` names the request in the log."""
        n = images.shape[0]
        if not self.accepting:
            raise Draining("the server is shutting down")
        if n > self.max_queue_objects:  # could never fit: retrying cannot help
            raise InputError("body", f"at most {self.max_queue_objects} cutouts per request (the queue's capacity; "
                             "split larger stacks)", f"{n} cutouts", status=413, title="request too large")
        refusal = self.admission(n)
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        now, bulk = self.clock(), n > self.max_batch_size
        pieces = []
        for start in range(0, n, self.max_batch_size):
            piece = _Piece(images[start:start + self.max_batch_size], ebv[start:start + self.max_batch_size],
                           loop.create_future(), now, now + timeout_s, request_id, bulk=bulk)
            pieces.append(piece)
            self._queue.append(piece)
            self._queued += piece.n
        self.stats.on_depth(self._queued)
        self._wakeup.set()
        try:  # one piece (most requests): its future itself, without gather's
            results = [await pieces[0].future] if len(pieces) == 1 else \
                await asyncio.gather(*(p.future for p in pieces))
        except BaseException:
            for p in pieces:  # caller gone: its remaining pieces are dropped unrun
                p.future.cancel()
            raise
        return concatenate_outputs(results)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # wait for a full batch or for the oldest piece's delay to pass; but an idle engine (no batch in
            # flight) whose last batch was one request's alone takes what is queued at once: requests come one at
            # a time, and a lone one would wait the delay for nothing (what comes meanwhile queues behind it)
            lone = not self._running and self._last_pieces <= 1 and not self.wait_when_idle
            while not lone and self._queued < self.max_batch_size and self._queue:
                remaining = self._queue[0].enqueued + self.max_queue_delay_s - self.clock()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            self._last_pieces = len(batch)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Piece]:
        batch, size, now = [], 0, self.clock()
        bulk = True  # every piece taken so far is bulk
        while self._queue:
            bulk = bulk and self._queue[0].bulk
            if size + self._queue[0].n > (self.max_bulk_batch_size if bulk else self.max_batch_size):
                break
            piece = self._queue.popleft()
            self._queued -= piece.n
            if piece.future.done():  # cancelled: the caller went away
                continue
            if now > piece.deadline:
                piece.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            piece.started = now
            self.stats.on_queue_wait(now - piece.enqueued)
            batch.append(piece)
            size += piece.n
        self.stats.on_depth(self._queued)
        return batch

    async def _run(self, batch: list[_Piece]) -> None:
        slot_held = True
        loop = asyncio.get_running_loop()
        try:
            images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
            ebv = np.concatenate([p.ebv for p in batch]) if len(batch) > 1 else batch[0].ebv
            alone = self.infer_alone is not None and len(self._running) <= 1 and not self._queue
            infer = self.infer_alone if alone and self.infer_alone is not None else self.infer
            start = time.perf_counter()
            try:
                outputs, isolation = await loop.run_in_executor(self._executor, isolate_batch, infer, images, ebv)
                self._report(batch, isolation, "model call")
                seconds = time.perf_counter() - start
                self.seconds_per_object = 0.8 * self.seconds_per_object + 0.2 * seconds / len(images)
                self.stats.on_batch(len(images), seconds)
                if self.finish is not None:
                    async with self._finishing:  # acquired before the model is freed: backpressure
                        self._slots.release()
                        slot_held = False
                        job = _FinishJob(batch, images, ebv, outputs, loop.create_future())
                        self._finish_jobs.append(job)
                        if self._finish_drains < self.finish_workers:
                            self._finish_drains += 1
                            drain = asyncio.create_task(self._drain_finishing())
                            self._drains.add(drain)  # a reference, as for the batches' tasks
                            drain.add_done_callback(self._drains.discard)
                        outputs = await job.future
            except Exception as exc:  # the engine failed on every cutout: this batch's callers fail, not the server
                _fail(batch, exc)
                return
            _hand_out(batch, outputs)
        finally:
            if slot_held:
                self._slots.release()

    async def _drain_finishing(self) -> None:
        """Finish the batches waiting for it, several at once: the quality flags' fixed cost per call (~1 ms
        on a CPU) is then paid once for all of them, so under load the finishing stage batches as the model
        does. One such loop per finishing thread."""
        loop, finish = asyncio.get_running_loop(), self.finish
        assert finish is not None
        try:
            while self._finish_jobs:
                jobs = [self._finish_jobs.popleft()]
                size = jobs[0].n
                while self._finish_jobs and size + self._finish_jobs[0].n <= self.max_finish_objects:
                    jobs.append(self._finish_jobs.popleft())
                    size += jobs[-1].n
                try:
                    images, ebv, outputs = _joined(jobs)
                    outputs, isolation = await loop.run_in_executor(self._finisher, _finish_isolated, finish, images,
                                                                    ebv, outputs)
                    self._report([p for job in jobs for p in job.batch], isolation, "finishing stage")
                except Exception as exc:  # every cutout failed alone and so did the stage: these batches fail
                    _fail(jobs, exc)
                    continue
                _hand_out(jobs, outputs)
        finally:
            self._finish_drains -= 1

    def _report(self, batch: list[_Piece], isolation: Isolation | None, stage: str) -> None:
        """Once per bisected batch: the log line (which requests' cutouts failed alone) and the metrics."""
        if isolation is None:
            return
        self.stats.on_isolated(len(isolation.failed_rows))
        starts = np.cumsum([0] + [p.n for p in batch])
        culprits = collections.defaultdict(list)
        for row in isolation.failed_rows:
            k = int(np.searchsorted(starts, row, side="right")) - 1
            culprits[batch[k].request_id or f"#{k}"].append(row - int(starts[k]))
        log.warning("%s failed on a batch of %d cutouts from requests %s (%s); bisected in %d calls: %d cutout(s) "
                    "fail alone (request: rows %s), the other cutouts were answered", stage, int(starts[-1]),
                    ", ".join(p.request_id or f"#{k}" for k, p in enumerate(batch)), isolation.describe(),
                    isolation.calls, len(isolation.failed_rows), dict(culprits))

    def expected_wait_s(self, n: int = 0) -> float:
        """How long the queued and incoming cutouts (plus ``n`` more) take to run at the measured rate, seconds."""
        return (self._queued + self.incoming + n) * self.seconds_per_object / self.workers

    def reserve(self, n: int) -> Reservation:
        """Count ``n`` cutouts of an admitted request as incoming until its body is decoded (or it ends)."""
        self.incoming += n
        self.stats.on_incoming(self.incoming)
        return Reservation(self, n)


    def admission(self, n: int, before_body: bool = False) -> QueueFull | None:
        """None if a request of ``n`` cutouts may queue now, else the 429 to answer.

        Two bounds: the queue's capacity in cutouts, and a latency target for
        a standing queue (CoDel's idea, applied at admission): once the work
        queued has taken longer than ``max_queue_wait_s`` to start for longer
        than twice that, the server is overloaded rather than bursting, and
        from then on a request is refused unless the queued work starts within
        the target (or within twice the request's own compute time, so large
        requests behind large requests are not refused for the queue they form
        themselves), until the queue has drained. A burst that drains in time
        is never refused by it; an admitted request is served while its client
        is still waiting. The wait comes from the measured rate.

        A burst that cannot drain in time is cut at once: beyond
        ``BURST_TARGETS`` x the target of queued work (the most that still
        drains to the target within the 2 x target allowed), a request is
        refused even before the queue counts as standing, again unless the
        wait is within twice its own compute time. Without this bound the
        onset of a 1,024-connection storm let ~630 single cutouts in within
        the first 2 x target (2.6 s of work on two cores; their p99 3-4 s).
        """
        if self._queued + self.incoming + n > self.max_queue_objects:
            return self.queue_full(n, before_body)
        if self.max_queue_wait_s is None:
            return None
        target, wait = self.max_queue_wait_s, self.expected_wait_s()
        now = self.clock()
        if not self._queued and not self.incoming:  # drained: overload, if it was one, is over
            self._above_since, self._dropping = None, False
            return None
        if wait <= target:
            if not self._dropping:
                self._above_since = None
            return None
        if self._above_since is None:
            self._above_since = now
        self._dropping = self._dropping or now - self._above_since > 2 * target
        too_much = self._dropping or wait > BURST_TARGETS * target
        if too_much and wait > 2 * n * self.seconds_per_object / self.workers:
            return self.queue_full(n, before_body, why=f"the queued work would take {wait:.2f} s to start "
                                                       f"(the target is {target:g} s)")
        return None

    def queue_full(self, n: int, before_body: bool = False, why: str | None = None) -> QueueFull:
        """The 429 for a request of ``n`` cutouts now: Retry-After from the measured drain rate."""
        wait = max(1.0, self.expected_wait_s(n))
        return QueueFull(self._queued, self.max_queue_objects, wait, close=before_body, why=why)

    def abort_queued(self, error: BaseException) -> int:
        """Fail every queued piece with ``error`` (the drain deadline passed); returns how many cutouts."""
        aborted = 0
        while self._queue:
            piece = self._queue.popleft()
            self._queued -= piece.n
            if not piece.future.done():
                piece.future.set_exception(error)
                aborted += piece.n
        self.stats.on_depth(self._queued)
        return aborted

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; wait until queued and running work is finished (or the timeout)."""
        self.accepting = False
        deadline = self.clock() + timeout_s
        while (self._queue or self._running) and self.clock() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
        if self._finisher is not None:
            self._finisher.shutdown(wait=True)


def name_native_thread() -> None:
    """Give this thread's Python name to the operating system too (Linux, 15 characters), so ``top -H``, py-spy
    and /proc/PID/task/*/comm tell the inference and flag threads apart (the benchmarks count their cores)."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _finish_isolated(finish: Callable[[np.ndarray, np.ndarray, Outputs], Outputs], images: np.ndarray,
                     ebv: np.ndarray, outputs: Outputs) -> tuple[Outputs, Isolation | None]:
    return isolate(lambda rows: finish(images[rows], ebv[rows], {k: v[rows] for k, v in outputs.items()}),
                   len(images), stage="the quality flags")


class Reservation:
    """Cutouts counted as incoming for one admitted request; :meth:`release` (idempotent) stops counting them."""

    __slots__ = ("batcher", "n")

    def __init__(self, batcher: Batcher, n: int) -> None:
        self.batcher, self.n = batcher, n

    def release(self) -> None:
        if self.n:
            self.batcher.incoming -= self.n
            self.batcher.stats.on_incoming(self.batcher.incoming)
        self.n = 0
