"""Prometheus metrics of one app instance (own registry, so tests can run several apps).

Under several worker processes (:mod:`photoz.service.workers`) each process writes its samples to the
multiprocess directory and :meth:`Metrics.render` shows every worker's, summed (the queue gauges by ``pid``).
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from photoz.service.batcher import BatchStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("photoz_requests", "HTTP prediction requests by status", ["status"], registry=r)
        self.request_latency = Histogram("photoz_request_latency_seconds", "Prediction request latency",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_latency = Histogram("photoz_queue_latency_seconds", "Time a cutout waited for its batch",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute_latency = Histogram("photoz_compute_latency_seconds", "Model time per batch",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch_size})
        self.batch_size = Histogram("photoz_batch_size", "Cutouts per model call",
                                    buckets=[b for b in batch_buckets if b <= max_batch_size], registry=r)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.queue_depth = Gauge("photoz_queue_depth", "Cutouts waiting for a batch", registry=r,
                                 multiprocess_mode="liveall")
        self.incoming = Gauge("photoz_incoming_cutouts", "Cutouts of admitted requests whose bodies are still "
                              "being read or decoded (counted against the queue)", registry=r,
                              multiprocess_mode="liveall")
        self.open_connections = Gauge("photoz_open_connections", "HTTP connections open (under photoz serve; "
                                      "once a second)", registry=r, multiprocess_mode="liveall")
        self.objects = Counter("photoz_objects", "Cutouts given a PDF", registry=r)
        # refusals decided from the headers alone (also counted in photoz_requests{status="429"})
        self._requests_429 = self.requests.labels(status="429")
        self._by_status: dict[int, Counter] = {429: self._requests_429}
        self.objects_rejected = Counter("photoz_objects_rejected", "Cutouts flagged invalid (no PDF)", registry=r)
        self.batches_bisected = Counter("photoz_batches_bisected", "Model calls (or finishing stages) that raised "
                                        "on a batch and were bisected so only the culprits failed", registry=r)
        self.objects_failed_alone = Counter("photoz_objects_failed_alone", "Cutouts on which the model failed "
                                            "alone (rejected; also in photoz_objects_rejected)", registry=r)
        self.refused_before_body = Counter("photoz_refused_before_body", "Requests refused (429) from their "
                                           "headers, before any body byte was read", registry=r)

    def count_request(self, status: int, seconds: float) -> None:
        """One prediction request answered with ``status`` after ``seconds`` (each status's child kept)."""
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(status=str(status))
        child.inc()
        self.request_latency.observe(seconds)

    def refuse_early(self) -> None:
        """Count a 429 decided from the headers (a refusal under a retry storm must cost next to nothing)."""
        self._requests_429.inc()
        self.refused_before_body.inc()

    def batch_stats(self) -> BatchStats:
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.compute_latency.observe(seconds)
            self.objects.inc(size)

        def on_isolated(failed_objects: int) -> None:
            self.batches_bisected.inc()
            self.objects_failed_alone.inc(failed_objects)

        return BatchStats(on_batch=on_batch, on_queue_wait=self.queue_latency.observe,
                          on_depth=self.queue_depth.set, on_isolated=on_isolated, on_incoming=self.incoming.set)

    def render(self) -> bytes:
        """The text exposition: this process's registry, or under worker processes every worker's samples."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
