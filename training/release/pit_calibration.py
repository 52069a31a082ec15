"""``photoz calibrate-pit``: fit a conditional PIT map (:mod:`photoz.model.recalibration`) for a model.

    photoz calibrate-pit --model runs/default/calibrated.pt --data data/sim-cal.h5 --out runs/default/pit-map.json
    photoz export --checkpoint runs/default/calibrated.pt --pit-map runs/default/pit-map.json --out model.onnx

The map is fitted on the PDFs of exactly the model that is then exported (a checkpoint, or a bundle exported
without a map: an ensemble or MC dropout), on labelled objects it was not trained on: every row of a
calibration file, or with ``--validation-of CHECKPOINT`` the validation rows of that run's split of its
training file. The JSON holds the map and the PIT KS per photometric-redshift bin before and after, on the
fitting rows (in-sample: the held-out evaluation of the exported bundle is the honest number).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from photoz.model.recalibration import KNOT_SPACING_Z, PRIOR_COUNT, PITMap, default_knots, fit_pit_map


def fitting_rows(data: str | Path, validation_of: str | Path | None) -> tuple[np.ndarray | None, str]:
    """All rows (None) of a calibration file, or a checkpoint's validation rows of its training file."""
    if validation_of is None:
        return None, "every row"
    from photoz.training.fit.checkpoints import load_checkpoint
    from photoz.training.fit.train import validation_rows

    rows, kind = validation_rows(load_checkpoint(validation_of)[1]["train_config"], data)
    return np.sort(rows), f"validation rows of {Path(validation_of).name} ({kind})"


def _ks_by_photometric_z(pdfs, bins, z) -> list[dict]:
    from photoz.training.evaluation.evaluate import score

    return [{"lo": b["lo"], "hi": b["hi"], "n": b["n"], "pit_ks": round(b["pit_ks"], 4)}
            for b in score(pdfs, bins, z)["by_photometric_redshift"]]


def calibrate_pit(model: str | Path, data: str | Path, out: str | Path, validation_of: str | Path | None = None,
                  knot_spacing: float = KNOT_SPACING_Z, prior_count: float = PRIOR_COUNT) -> dict:
    """Fit the map on ``model``'s PDFs for ``data`` (see the module docstring), write the JSON report to
    ``out`` and return it."""
    from photoz.training.evaluation.evaluate import predict_file
    from photoz.training.fit.data import read_labels

    if Path(model).suffix == ".onnx":
        from photoz.model.bundle import load_bundle

        if "recalibration" in load_bundle(model).metadata.document:
            raise ValueError(f"{model} already applies a PIT map: fit on a bundle exported without --pit-map (or on "
                             "its checkpoint), so the new map is not stacked on the old one")
    rows, which = fitting_rows(data, validation_of)
    pdfs, bins = predict_file(model, data, rows=rows)
    z = read_labels(data, rows)["z"]
    pit_map = fit_pit_map(pdfs, bins, z, default_knots(bins, knot_spacing), prior_count=prior_count)
    report = {"map": pit_map.to_metadata(),
              "fitted_on": {"model": Path(model).name, "data": Path(data).name, "rows": which, "n": int(z.size)},
              "pit_ks_by_photometric_redshift": {"before": _ks_by_photometric_z(pdfs, bins, z),
                                                 "after (in-sample)": _ks_by_photometric_z(
                                                     pit_map.apply(pdfs, bins), bins, z)}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def load_pit_map(path: str | Path) -> tuple[PITMap, dict]:
    """A ``calibrate-pit`` report's map, and where it was fitted."""
    try:
        report = json.loads(Path(path).read_text())
        return PITMap.from_metadata(report["map"]), report.get("fitted_on", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a `photoz calibrate-pit` report: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="photoz calibrate-pit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.pt) or bundle (.onnx) exported without a map")
    parser.add_argument("--data", required=True, help="labelled HDF5 the model was not trained on (or its training "
                                                      "file with --validation-of)")
    parser.add_argument("--out", required=True, help="the map and its report (.json), for photoz export --pit-map")
    parser.add_argument("--validation-of", default=None,
                        help="fit on this checkpoint's validation rows of --data instead of every row")
    parser.add_argument("--knot-spacing", type=float, default=KNOT_SPACING_Z,
                        help=f"redshift spacing of the map's knots (default {KNOT_SPACING_Z})")
    parser.add_argument("--prior-count", type=float, default=PRIOR_COUNT,
                        help=f"pseudo-objects with uniform PIT per knot (default {PRIOR_COUNT:g})")


def run(args: argparse.Namespace) -> int:
    report = calibrate_pit(args.model, args.data, args.out, args.validation_of, args.knot_spacing, args.prior_count)
    ks = report["pit_ks_by_photometric_redshift"]
    print(f"fitted on {report['fitted_on']['n']} objects ({report['fitted_on']['rows']})")
    print("photometric z      n   PIT KS before  after (in-sample)")
    for before, after in zip(ks["before"], ks["after (in-sample)"], strict=True):
        print(f"{before['lo']:.2f}-{before['hi']:.2f}  {before['n']:6d}  {before['pit_ks']:13.3f}  "
              f"{after['pit_ks']:.3f}")
    print(f"map in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
