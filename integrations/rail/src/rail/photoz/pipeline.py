"""The photoz RAIL pipeline: inform (adopt a bundle) -> estimate (cutouts -> qp.hist) -> RAIL's evaluation.

Build its ceci yaml with :func:`write_pipeline` (or ``python -m rail.photoz.pipeline``) and run it with
``ceci photoz_image.yml``; docs/rail.md walks through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rail.core.stage import RailPipeline
from rail.estimation.algos.photoz_image import PhotozImageEstimator, PhotozImageInformer
from rail.evaluation.dist_to_point_evaluator import DistToPointEvaluator
from rail.evaluation.point_to_point_evaluator import PointToPointEvaluator

#: RAIL's point metrics (qp.metrics) and what photoz calls them (photoz.model.pdf.photoz_metrics).
POINT_METRICS = {"point_bias": "rail_bias", "point_stats_iqr": "rail_sigma_iqr",
                 "point_outlier_rate": "rail_outlier_rate", "point_stats_sigma_mad": "sigma_mad"}
#: The truth table the evaluators read: RAIL's convention (a group and a redshift column).
TRUTH_GROUP, TRUTH_COLUMN = "photometry", "redshift"


class PhotozImagePipeline(RailPipeline):
    """inform_photoz -> estimate_photoz -> evaluate_points_photoz (point metrics of ``z_mean``, photoz's
    headline estimate) and evaluate_pit_photoz (the PIT)."""

    default_input_dict: dict[str, str] = {"input_cutouts": "cutouts.hdf5", "input_truth": "truth.hdf5"}

    def __init__(self, bundle: str = "photoz.onnx", url: str = "", chunk_size: int = 10_000,
                 providers: str = "auto") -> None:
        RailPipeline.__init__(self)
        self.inform_photoz = PhotozImageInformer.build(bundle=bundle)
        self.estimate_photoz = PhotozImageEstimator.build(
            aliases={"input": "input_cutouts"}, connections={"model": self.inform_photoz.io.model},
            hdf5_groupname="", chunk_size=chunk_size, url=url, providers=providers)
        self.evaluate_points_photoz = PointToPointEvaluator.build(
            aliases={"truth": "input_truth"}, connections={"input": self.estimate_photoz.io.output},
            metrics=list(POINT_METRICS), point_estimate_key="z_mean", reference_dictionary_key=TRUTH_COLUMN,
            hdf5_groupname=TRUTH_GROUP, force_exact=True)
        self.evaluate_pit_photoz = DistToPointEvaluator.build(
            aliases={"truth": "input_truth"}, connections={"input": self.estimate_photoz.io.output},
            metrics=["pit"], reference_dictionary_key=TRUTH_COLUMN, hdf5_groupname=TRUTH_GROUP, force_exact=True)


def write_truth(cutouts: str | Path, out: str | Path) -> Path:
    """The evaluators' truth table from a photoz data set (its ``z``): ``photometry/redshift`` in HDF5."""
    import h5py

    with h5py.File(cutouts, "r") as src, h5py.File(out, "w") as dst:
        if "z" not in src:
            raise ValueError(f"{cutouts}: expected a dataset 'z' (true redshifts) to evaluate against, got "
                             f"{sorted(src)}")
        dst.create_dataset(f"{TRUTH_GROUP}/{TRUTH_COLUMN}", data=src["z"][:])
    return Path(out)


def write_pipeline(out_yaml: str | Path, cutouts: str | Path, truth: str | Path, bundle: str | Path,
                   output_dir: str | Path, url: str = "", chunk_size: int = 10_000, providers: str = "auto") -> Path:
    """The pipeline's ceci yaml (and its stage config beside it) for these inputs."""
    pipe = PhotozImagePipeline(str(bundle), url, chunk_size, providers)
    inputs: dict[str, Any] = {"input_cutouts": str(cutouts), "input_truth": str(truth)}
    pipe.initialize(inputs, {"output_dir": str(output_dir), "log_dir": str(output_dir), "resume": False}, None)
    pipe.save(str(out_yaml))
    return Path(out_yaml)


def run_pipeline(yaml_path: str | Path) -> None:
    """``ceci yaml_path``, with this Python's ``bin`` first on PATH (ceci starts each stage as ``python3``)."""
    import os
    import subprocess
    import sys

    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    ceci = Path(bindir) / "ceci"
    command = [str(ceci)] if ceci.exists() else [sys.executable, "-c", "import sys; from ceci.main import main; "
                                                                      "sys.exit(main())"]
    subprocess.run([*command, str(yaml_path)], env=env, check=True)


def read_metrics(output_dir: str | Path, truth: str | Path) -> dict[str, float]:
    """RAIL's numbers from a finished run: its evaluator's point metrics (under photoz's names) and the KS
    statistic of the PIT of its estimates by qp (``qp.metrics.pit.PIT``, as RAIL's PIT metrics)."""
    import h5py
    import numpy as np
    import qp
    from qp.metrics.pit import PIT

    out = Path(output_dir)
    with h5py.File(out / "summary_evaluate_points_photoz.hdf5", "r") as h5:
        metrics = {photoz: float(np.ravel(h5[rail][()])[0]) for rail, photoz in POINT_METRICS.items()}
    with h5py.File(truth, "r") as h5:
        z = h5[f"{TRUTH_GROUP}/{TRUTH_COLUMN}"][:]
    ensemble = qp.read(str(out / "output_estimate_photoz.hdf5"))
    metrics["pit_ks"] = float(PIT(ensemble, z).evaluate_PIT_KS().statistic)
    return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write (and run) the photoz RAIL pipeline: inform -> estimate "
                                                 "-> RAIL's evaluation")
    parser.add_argument("--cutouts", required=True, help="HDF5 data set: images, ebv, z (photoz simulate's)")
    parser.add_argument("--bundle", required=True, help="photoz bundle (.onnx)")
    parser.add_argument("--out-dir", default="rail-photoz", help="where the yaml, truth table and outputs go")
    parser.add_argument("--url", default="", help="a running photoz service to estimate with instead")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--providers", default="auto")
    parser.add_argument("--no-run", action="store_true", help="write the yaml only")
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    truth = write_truth(args.cutouts, out / "truth.hdf5")
    yaml_path = write_pipeline(out / "photoz_image.yml", Path(args.cutouts).resolve(), truth,
                               Path(args.bundle).resolve(), out / "outputs", args.url, args.chunk_size, args.providers)
    print(f"wrote {yaml_path}")
    if args.no_run:
        return 0
    run_pipeline(yaml_path)
    for name, value in read_metrics(out / "outputs", truth).items():
        print(f"{name:20s} {value:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
