"""Service settings: environment variables ``PHOTOZ_*``, overridden by ``photoz serve`` flags."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from photoz.formats.cutouts import DecodeLimits, MiB
from photoz.model.bundle import default_bundle_path

DEFAULT_MODEL = default_bundle_path()


class Settings(BaseModel):
    """Every knob of the service. Environment variable: ``PHOTOZ_`` + the upper-case name."""

    model: Path = Field(DEFAULT_MODEL, description="model bundle (.onnx)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535)
    providers: str = Field("auto", description="ONNX Runtime providers: auto | tensorrt | cuda | cpu")
    intra_op_threads: int = Field(0, ge=0, description="ORT threads per batch (0: cores / inference_workers)")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0: ORT's default)")
    workers: int = Field(0, ge=0, description="HTTP worker processes serving the port, each with its own engine "
                                              "(0: auto, 1 on a CPU host, up to 4 on a GPU host)")
    inference_workers: int = Field(2, ge=1, description="batches run at the same time (per worker process)")
    flag_workers: int = Field(1, ge=1, description="threads measuring the cutouts' quality flags beside the "
                                                  "model calls (~0.25 ms of CPU per cutout; on a GPU, raise "
                                                  "it until the GPU stays busy)")
    solo_threads: int = Field(0, ge=0, description="CPU: ORT threads for a batch that runs alone, with nothing "
                                                   "queued (light load); 0: all cores")
    max_batch_size: int = Field(8, ge=1, description="most cutouts per model call (CPU: ~8; GPU: 64-256)")
    max_bulk_batch_size: int = Field(0, ge=0, description="most cutouts per model call when a batch holds only "
                                                         "pieces of requests larger than max_batch_size "
                                                         "(0: auto, 2 x max_batch_size without shape buckets, "
                                                         "max_batch_size with them)")
    shape_buckets: Literal["auto", "on", "off"] = Field("auto", description="pad batches to fixed sizes (powers "
                                                                           "of two up to max_batch_size), one "
                                                                           "session each; auto: on GPUs")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="longest wait of the oldest queued cutout")
    wait_when_idle: bool = Field(False, description="a request that comes alone to an idle engine waits "
                                                    "max_queue_delay_ms for others too (default: it runs at once)")
    max_queue_objects: int = Field(8192, ge=1, description="queued cutouts beyond which requests get 429")
    http_nice: int = Field(2, ge=0, le=19, description="niceness added to the HTTP event loop after start-up, so "
                                                       "inference keeps the cores under overload (0: off)")
    refusal_delay_ms: float = Field(1000.0, ge=0, description="a 429 decided from the headers is sent after this "
                                                             "long (no CPU), throttling clients that ignore "
                                                             "Retry-After (0: at once)")
    max_refusals_per_s: float = Field(200.0, ge=0, description="under a storm, 429s answered per second at most: "
                                                               "a refusal waits its turn on a timer (0: no bound)")
    max_queue_wait_ms: float = Field(150.0, gt=0, description="429 when the queued work would take longer than "
                                                              "this to start (large requests: twice their own "
                                                              "compute time)")
    max_body_mb: float = Field(64.0, gt=0, description="largest request body, MiB (413 above)")
    max_decoded_mb: float = Field(128.0, gt=0, description="largest decoded request (all its arrays, counted "
                                                           "before decompression or allocation), MiB (413 above)")
    max_json_mb: float = Field(4.0, gt=0, description="largest JSON body, MiB (413 above)")
    max_parts: int = Field(64, ge=1, description="most files in one multipart request")
    max_hdus: int = Field(64, ge=1, description="most HDUs read from one FITS file")
    body_timeout_s: float = Field(10.0, gt=0, description="a body that sends nothing for this long gets 408")
    max_inflight_body_mb: float = Field(256.0, gt=0, description="request bodies being read at once, MiB "
                                                                "(429 beyond)")
    request_timeout_s: float = Field(60.0, gt=0, description="default deadline of a request")
    api_keys: list[str] = Field(default_factory=list, description="bearer tokens; empty: no auth")
    require_api_keys: bool = Field(False, description="refuse to start without an API key (deployments that "
                                                      "must never serve unauthenticated, e.g. an unfilled "
                                                      "Kubernetes Secret)")
    warmup: bool = Field(True, description="run every batch-size bucket once before ready")
    drain_timeout_s: float = Field(30.0, gt=0)
    log_level: str = Field("info")

    @field_validator("providers")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        from photoz.model.runtime import PROVIDER_CHOICES

        if value not in PROVIDER_CHOICES:
            raise ValueError(f"must be one of {', '.join(PROVIDER_CHOICES)}")
        return value

    @model_validator(mode="after")
    def _keys_when_required(self) -> Settings:
        if self.require_api_keys and not self.api_keys:
            raise ValueError("require_api_keys is set but no API key is configured: set PHOTOZ_API_KEYS "
                             "(comma-separated) or --api-keys")
        return self

    def worker_count(self, gpu: bool) -> int:
        """The worker processes to start: ``workers``, or when 0, 1 on a CPU host (the engine needs the cores) and
        on a GPU host enough to keep it busy: one per 4 cores, at most 4 (a single process's HTTP side feeds an
        H200 ~1,000 single cutouts/s of its ~40,000)."""
        if self.workers:
            return self.workers
        return max(1, min(4, (os.cpu_count() or 1) // 4)) if gpu else 1

    def bulk_batch_size(self, buckets: bool) -> int:
        """Most cutouts in a batch of large requests' pieces: ``max_bulk_batch_size``, or when 0, twice
        ``max_batch_size`` on an engine without shape buckets (a CPU: a batch of 16 runs ~5% faster per cutout than
        8, measured, and single cutouts never wait behind one) and ``max_batch_size`` with them (a GPU's batch is
        already large, and a new bucket would be one more shape to tune)."""
        if self.max_bulk_batch_size:
            return max(self.max_bulk_batch_size, self.max_batch_size)
        return self.max_batch_size if buckets else 2 * self.max_batch_size

    @property
    def threads_per_batch(self) -> int:
        """ORT intra-op threads: the cores shared among concurrent batches unless set."""
        return self.intra_op_threads or max(1, (os.cpu_count() or 1) // self.inference_workers)

    @property
    def threads_when_alone(self) -> int:
        """ORT intra-op threads for a batch with no other batch running and nothing queued."""
        return self.solo_threads or (os.cpu_count() or 1)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MiB)

    @property
    def max_inflight_body_bytes(self) -> int:
        return int(self.max_inflight_body_mb * MiB)

    @property
    def decode_limits(self) -> DecodeLimits:
        """What one request may decode to (see :class:`~photoz.formats.cutouts.DecodeLimits`)."""
        return DecodeLimits(int(self.max_decoded_mb * MiB), self.max_hdus, self.max_parts,
                            int(self.max_json_mb * MiB))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``PHOTOZ_*`` variables, then ``overrides`` (flags; None means not given).

        A blank ``PHOTOZ_API_KEYS`` counts as unset (``${PHOTOZ_API_KEYS:-}`` in a compose file).
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(f"PHOTOZ_{name.upper()}")
            if raw is None:
                continue
            values[name] = parse_api_keys(raw) if name == "api_keys" else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_api_keys(raw: str) -> list[str]:
    """Comma-separated keys, surrounding spaces stripped, empty items dropped."""
    return [k.strip() for k in raw.split(",") if k.strip()]
