"""The release's job objects (:mod:`photoz.jobs`): ``photoz export`` and ``photoz ship``, from which their flags
are generated. Standard library only (the ``photoz`` command builds its parser without importing torch)."""
from __future__ import annotations

from dataclasses import dataclass

from photoz.jobs import option, required


@dataclass
class ExportJob:
    """``photoz export``: a checkpoint, or several (a deep ensemble: one architecture and data set, different
    seeds; their PDFs averaged in the graph), to a bundle with its training record and its flags' thresholds."""

    checkpoint: list[str] = required("checkpoint(s); several (one architecture and data set, different --seed) are "
                                     "exported as one deep ensemble that averages their PDFs (serving costs one "
                                     "network per member)", nargs="+")
    out: str = required("bundle path (.onnx)")
    name: str = option("photoz-sdss-sim", "the bundle's name")
    version: str = option("0.1.0", "the bundle's version")
    held_out_report: str | None = option(None, "metrics.json of `photoz evaluate` on held-out data")
    fp16: bool = option(False, "float16 weights and compute (GPU serving); inputs and outputs stay float32")
    reference_data: str | None = option(None, "labelled HDF5 whose first 20,000 cutouts set the out-of-distribution "
                                              "flags' thresholds (default: the checkpoint's training set)")
    thresholds: bool = option(True, "measure the flags' thresholds (minutes on a CPU); --no-thresholds: a bundle to "
                                    "score, not to ship (its flags are the fixed-definition ones)")
    mc_passes: int = option(0, "MC dropout: average this many passes through the dense head with dropout kept on "
                               "(a network trained with --dropout; masks drawn once from --mc-seed, fixed in the "
                               "graph)")
    mc_seed: int = option(0, "seed of the MC dropout masks")
    pit_map: str | None = option(None, "a `photoz calibrate-pit` report: its conditional PIT map is applied to the "
                                       "PDF in the graph")


@dataclass
class ShipJob:
    """``photoz ship``: the release of a trained run as the shipped bundle, in one command (what ``make ship``
    runs): export a candidate without thresholds, score that very graph on the held-out set with the catalogue
    baselines, export the bundle with the score and its flags' thresholds measured on the training set, run the
    flags' injection report, and write the model card beside the bundle."""

    run: str = required("the training run's directory (its eval/ and candidate.onnx are written there)")
    train_data: str = required("the training set (HDF5): the baselines' training data and the thresholds' reference")
    test_data: str = required("the held-out set (HDF5) the bundle is scored on")
    version: str = required("the bundle's version")
    out: str = option("model/bundles/photoz-sdss-sim.onnx", "the bundle to write (its card: the same name, .md)")
    checkpoint: list[str] | None = option(None, "checkpoint(s) to ship (default: RUN/best.pt; several: a deep "
                                                "ensemble)", nargs="+")
    name: str = option("photoz-sdss-sim", "the bundle's name")
    pit_map: str | None = option(None, "a `photoz calibrate-pit` report applied in the graph")
