"""Where the pipeline's inference runs: a local ONNX Runtime session or a running photoz service.

Both engines answer the same questions (which geometry, which bins, which
model) and take the same call, so ``photoz predict`` has one route whatever
runs the model::

    engine = open_engine(model="bundle.onnx")          # or open_engine(url="http://gpu-host:8000")
    outputs = engine.run(images, ebv)                  # probs + point estimates, row-aligned, NaN if refused
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from photoz.formats.cutouts import Geometry
from photoz.formats.results import ModelInfo
from photoz.model.bundle import load_bundle
from photoz.model.isolation import ROW_ERRORS, isolate_batch
from photoz.model.pdf import ESTIMATES, RedshiftBins
from photoz.model.priors import training_nz
from photoz.model.quality import bits_from_names
from photoz.model.runtime import OnnxPredictor

log = logging.getLogger("photoz.pipeline")


class Engine(Protocol):
    """What ``photoz predict`` needs of whatever runs the model."""

    geometry: Geometry
    edges: np.ndarray
    model: ModelInfo
    train_prior: np.ndarray | None  # the training set's n(z) per bin (photoz.model.priors), if recorded

    def run(self, images: np.ndarray, ebv: np.ndarray) -> dict[str, np.ndarray]:
        """``probs`` (N, n_bins), every point estimate (N,) and ``flag_bits`` (N,), row-aligned with ``images``."""
        ...


class LocalEngine:
    """A bundle in this process, run in batches of ``batch_size``."""

    def __init__(self, bundle_path: str | Path, providers: str = "auto", batch_size: int = 64,
                 threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        bundle = load_bundle(bundle_path)
        self.predictor = OnnxPredictor(bundle, providers, intra_op_threads=threads)
        self.batch_size = batch_size
        md = bundle.metadata
        self.geometry, self.edges, self.model = Geometry(md.bands, md.cutout_size), md.bins.edges, ModelInfo.of(bundle)
        self.train_prior = training_nz(md.document, md.bins)

    def run(self, images: np.ndarray, ebv: np.ndarray) -> dict[str, np.ndarray]:
        """Batch by batch; a batch the model fails on is bisected: its culprits come back NaN with their error
        under ``row_errors`` (:mod:`photoz.model.isolation`), the run goes on."""
        step = self.batch_size
        outs = [self._run_batch(images[i:i + step], ebv[i:i + step]) for i in range(0, len(images), step)]
        if any(ROW_ERRORS in o for o in outs):
            for o in outs:
                o.setdefault(ROW_ERRORS, np.full(len(o["probs"]), None, object))
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _run_batch(self, images: np.ndarray, ebv: np.ndarray) -> dict[str, np.ndarray]:
        outputs, isolation = isolate_batch(self.predictor.predict_with_estimates, images, ebv)
        if isolation is not None:
            log.warning("the model failed on a batch of %d cutouts (%s); bisected in %d calls: rows %s of the batch "
                        "fail alone and are rejected, the rest answered", len(images), isolation.describe(),
                        isolation.calls, list(isolation.failed_rows))
        return outputs


class RemoteEngine:
    """The same work sent to a running service through the Python client."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from photoz.service.client import PhotozClient

        self.client = PhotozClient(url, api_key=api_key)
        info = self.client.models()["models"][0]
        self.geometry = Geometry(tuple(info["bands"]), info["cutout_size_pixels"])
        bins = RedshiftBins.from_metadata(info["metadata"]["redshift_bins"])
        self.edges, self.model = bins.edges, ModelInfo(info["name"], info["version"], info["sha256"])
        self.train_prior = training_nz(info["metadata"], bins)

    def run(self, images: np.ndarray, ebv: np.ndarray) -> dict[str, np.ndarray]:
        n = len(images)
        res = self.client.predict(images, ebv=ebv, ids=[str(i) for i in range(n)])
        rows = np.array([int(i) for i in res.ids], dtype=int)  # objects the service refused are absent
        out = {"probs": np.full((n, len(self.edges) - 1), np.nan, np.float32),
               **{key: np.full(n, np.nan) for key in ESTIMATES}}
        out["probs"][rows] = res.pdfs
        for key in ESTIMATES:
            out[key][rows] = res.estimates[key]
        out["flag_bits"] = np.zeros(n, np.uint32)
        out["flag_bits"][rows] = bits_from_names(res.flags)
        out[ROW_ERRORS] = np.full(n, None, object)  # the service's reasons for the objects it refused
        for entry in res.rejected:
            out[ROW_ERRORS][int(entry["id"])] = f"refused by the service: {entry['error']}"
        return out


def open_engine(model: str | Path | None = None, url: str | None = None, api_key: str | None = None,
                providers: str = "auto", batch_size: int = 64) -> LocalEngine | RemoteEngine:
    """A :class:`RemoteEngine` when ``url`` is given, else a :class:`LocalEngine` on ``model``."""
    if url:
        return RemoteEngine(url, api_key)
    if model is None:
        raise ValueError("give a model bundle or the url of a running service")
    return LocalEngine(model, providers, batch_size)
