"""How much redshift information a simulated catalogue holds beyond colours: kNN on more and more columns.

    python -m benchmarks.catalogue_information [--train data/sim-train.h5] [--test data/sim-test.h5]

The same kNN as the strong catalogue baseline (k = 16, standardised features, the neighbours' median
redshift), trained on one simulated file and scored on another, on dereddened model r + 4 colours, then with
the Petrosian half-light radius (log), the concentration (R50 / R_Petrosian) and E(B-V) added, and on the
simulation's noise-free magnitudes (the truth; a ceiling, not a method). If size and concentration add
little, the images' structure carries little redshift information that colours lack, and a network on the
pixels cannot do much better than the catalogue. Prints a table, writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from photoz.model.conventions import dereddened  # noqa: E402
from photoz.model.pdf import photoz_metrics  # noqa: E402
from photoz.training.baselines import KNNPhotoZ  # noqa: E402

K_NEIGHBOURS = 16
FEATURE_SETS = {
    "model r + 4 colours": (),
    "+ log R50": ("size",),
    "+ log R50 + concentration": ("size", "concentration"),
    "+ log R50 + concentration + E(B-V)": ("size", "concentration", "ebv"),
    "noise-free r + 4 colours (truth; a ceiling)": ("truth",),
}


def load(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        out = {"z": f["z"][:], "ebv": f["ebv"][:], "mag_true": f["truth/mag_true"][:]}
        for key in ("model_mag", "petro_r50_arcsec", "petro_rad_arcsec"):
            out[key] = f[f"catalogue/{key}"][:]
    return out


def features(d: dict[str, np.ndarray], extra: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Magnitudes (dereddened model, or the truth's) and the extra columns the feature set names."""
    mags = d["mag_true"] if "truth" in extra else dereddened(d["model_mag"], ebv=d["ebv"])
    columns = []
    if "size" in extra:
        columns.append(np.log10(np.maximum(d["petro_r50_arcsec"], 0.1)))
    if "concentration" in extra:
        columns.append(d["petro_r50_arcsec"] / np.maximum(d["petro_rad_arcsec"], 0.1))
    if "ebv" in extra:
        columns.append(d["ebv"])
    return mags, np.column_stack(columns) if columns else None


def knn_scores(train: dict, test: dict, extra: tuple[str, ...]) -> dict[str, float]:
    """The catalogue baseline's kNN on these features, scored on the neighbours' median redshift."""
    knn = KNNPhotoZ(k=K_NEIGHBOURS)
    train_mags, train_extra = features(train, extra)
    knn.fit(train_mags, train["z"], extra=train_extra)
    return photoz_metrics(np.median(knn.neighbour_redshifts(*features(test, extra)), axis=1), test["z"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, default=ROOT / "data" / "sim-train.h5")
    parser.add_argument("--test", type=Path, default=ROOT / "data" / "sim-test.h5")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    train, test = load(args.train), load(args.test)
    rows = {name: knn_scores(train, test, extra) for name, extra in FEATURE_SETS.items()}
    print(f"kNN (k={K_NEIGHBOURS}) trained on {train['z'].size:,} galaxies of {args.train.name}, "
          f"tested on {test['z'].size:,} of {args.test.name}")
    print("| features | sigma_MAD | outliers |\n| --- | --- | --- |")
    for name, s in rows.items():
        print(f"| {name} | {s['sigma_mad']:.4f} | {100 * s['outlier_fraction']:.2f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"catalogue-information-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"train": str(args.train), "n_train": int(train["z"].size), "test": str(args.test),
                                "n_test": int(test["z"].size), "k": K_NEIGHBOURS, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
