"""The serving engine of one process: the bundle, its ONNX Runtime sessions, metrics and the batcher.

``start()`` loads and validates the bundle, opens the sessions (a second,
all-core CPU session for batches that run alone), runs every batch-size
bucket once so the first requests pay no set-up cost, and starts the
batcher; ``stop()`` drains the queue (up to the drain timeout) and stops it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from functools import partial

import numpy as np

from photoz.formats.cutouts import Geometry
from photoz.model.bundle import Bundle, load_bundle
from photoz.model.priors import training_nz
from photoz.model.runtime import OnnxPredictor, bucket_sizes
from photoz.service.batcher import Batcher
from photoz.service.metrics import Metrics
from photoz.service.settings import Settings

CPU = "CPUExecutionProvider"

log = logging.getLogger("photoz.service")


def warm_up(predictor: OnnxPredictor, max_batch_size: int, largest_batch: int = 0) -> tuple[list[int], float]:
    """Run each batch-size bucket once, and the quality flags once (their compiled features are compiled or loaded
    from numba's cache then), so the first real requests pay no set-up cost; then time a full batch.

    Buckets run up to ``largest_batch`` (a bulk batch's size, when larger than ``max_batch_size``). Returns the
    sizes run and the seconds per cutout of a full batch of ``max_batch_size`` (the batcher's first estimate of its
    rate, for Retry-After and the queue-wait target, until real batches refine it).
    """
    md = predictor.metadata
    sizes = list(bucket_sizes(max(max_batch_size, largest_batch)))
    for n in sizes:
        predictor.predict(np.zeros((n, len(md.bands), md.cutout_size, md.cutout_size), np.float32),
                          np.zeros(n, np.float32))
    full = np.zeros((max_batch_size, len(md.bands), md.cutout_size, md.cutout_size), np.float32)
    predictor.image_flag_bits(full[:1], np.zeros(1, np.float32))
    start = time.perf_counter()
    predictor.predict_with_estimates(full, np.zeros(max_batch_size, np.float32), image_flags=False)
    return sizes, (time.perf_counter() - start) / max_batch_size


def lower_this_threads_priority(increment: int) -> None:
    """Raise this thread's nice value: under overload the HTTP side (this event loop and the threads it starts
    from now on) yields the cores to inference, so refusing a retry storm cannot starve accepted work."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.warning("could not lower the HTTP thread's priority: %s", exc)
        return
    log.info("HTTP event loop at nice +%d (inference threads keep priority)", increment)


class ServingEngine:
    """Everything a request needs besides HTTP: ``bundle``, ``geometry``, ``batcher``, ``metrics``, ``provider``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bundle: Bundle = load_bundle(settings.model)
        md = self.bundle.metadata
        self.geometry = Geometry(md.bands, md.cutout_size)
        # the training set's n(z) (regularised), which a request's prior divides out; None if not recorded
        self.train_prior = training_nz(md.document, md.bins)
        self.predictor = OnnxPredictor(self.bundle, settings.providers, settings.threads_per_batch,
                                       settings.inter_op_threads, allow_spinning=False)
        buckets = settings.shape_buckets == "on" or (settings.shape_buckets == "auto" and self.provider != CPU)
        # most cutouts per model call: a batch of large requests' pieces may exceed max_batch_size
        self.largest_batch = settings.bulk_batch_size(buckets)
        if buckets:
            self.predictor.use_buckets(bucket_sizes(self.largest_batch))
        self.metrics = Metrics(self.largest_batch)
        self.solo = self._solo_predictor()
        # the model call leaves the cutouts' quality flags to the batcher's finishing threads (add_image_flags):
        # on a GPU the flags' CPU time per cutout is far more than the network's GPU time
        self.batcher = Batcher(partial(self.predictor.predict_with_estimates, image_flags=False),
                               settings.max_batch_size, settings.max_queue_delay_ms / 1000, settings.max_queue_objects,
                               settings.inference_workers, self.metrics.batch_stats(),
                               infer_alone=partial(self.solo.predict_with_estimates, image_flags=False)
                               if self.solo is not None else None,
                               max_queue_wait_s=settings.max_queue_wait_ms / 1000,
                               finish=self.add_image_flags, finish_workers=settings.flag_workers,
                               max_bulk_batch_size=self.largest_batch, wait_when_idle=settings.wait_when_idle)
        self._log_loaded()

    @property
    def provider(self) -> str:
        return self.predictor.provider

    def add_image_flags(self, images: np.ndarray, ebv: np.ndarray,
                        outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch's outputs with the flags measured on its cutouts added to the PDF's own."""
        return {**outputs, "flag_bits": outputs["flag_bits"] | self.predictor.image_flag_bits(images, ebv)}

    def _solo_predictor(self) -> OnnxPredictor | None:
        """On a CPU, a second session on the same bundle for lone batches (a GPU needs none: one batch fills it)."""
        s = self.settings
        if self.provider != CPU or s.threads_when_alone <= s.threads_per_batch:
            return None
        return OnnxPredictor(self.bundle, "cpu", s.threads_when_alone, s.inter_op_threads, allow_spinning=False)

    def _log_loaded(self) -> None:
        import onnxruntime as ort

        md, s = self.bundle.metadata, self.settings
        log.info("model %s %s (sha256 %s) loaded from %s", md.name, md.version, self.bundle.sha256[:12], s.model)
        log.info("execution provider: %s (requested %r; this onnxruntime offers %s)", self.provider,
                 s.providers, ", ".join(ort.get_available_providers()))
        if s.providers != "cpu" and self.provider == "CPUExecutionProvider":
            log.warning("no GPU execution provider is usable here: falling back to CPUExecutionProvider")

    async def start(self) -> None:
        s = self.settings
        if s.warmup:
            for engine in filter(None, (self.solo, self.predictor)):
                sizes, seconds_per_object = await asyncio.to_thread(warm_up, engine, s.max_batch_size,
                                                                    self.largest_batch)
            self.batcher.seconds_per_object = seconds_per_object  # the batch engine's, measured last
            log.info("warmed up batch sizes %s (%.2f ms per cutout in a full batch)", sizes, 1000 * seconds_per_object)
        self.batcher.start()
        if s.http_nice:
            lower_this_threads_priority(s.http_nice)
        log.info("ready: max_batch_size=%d (bulk %d) max_queue_delay_ms=%g inference_workers=%d "
                 "threads_per_batch=%d threads_when_alone=%s", s.max_batch_size, self.largest_batch,
                 s.max_queue_delay_ms, s.inference_workers, s.threads_per_batch,
                 s.threads_when_alone if self.solo is not None else "-")

    async def stop(self) -> None:
        await self.batcher.drain(self.settings.drain_timeout_s)
        await self.batcher.close()
        log.info("drained and stopped")
