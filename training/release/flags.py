"""The out-of-distribution flags' thresholds of a bundle, measured on its training set when it is exported
(``photoz export``, ``photoz ood-thresholds``): the features' tail quantiles and the blend detector trained on the
same cutouts (:mod:`photoz.model.quality` defines the features and flags; :mod:`photoz.training.evaluation.ood`
reports how many injected anomalies they catch)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS, PIXEL_SCALE_ARCSEC
from photoz.model.features import BlendNet, blend_input, cutout_features, sky_background
from photoz.model.quality import quality_metadata
from photoz.training.fit.data import read_cutouts

#: Objects whose features set the thresholds (the first rows of the training set: enough for 0.2% tails).
REFERENCE_OBJECTS = 20_000
READ_BLOCK = 2_000


def simulated_saturation(path: str | Path, n: int) -> np.ndarray | None:
    """Which of a simulated file's first ``n`` cutouts the simulator saturated (its catalogue's flags, bit
    ``FLAG_SATURATED``), or None when the file has no catalogue flags."""
    import h5py

    from photoz.training.simulation.instrument import FLAG_SATURATED

    with h5py.File(path, "r") as h5:
        if "catalogue/flags" not in h5:
            return None
        return (np.asarray(h5["catalogue/flags"][:n]).astype(np.int64) & FLAG_SATURATED) != 0


def reference_quality(data: str | Path, n: int = REFERENCE_OBJECTS, seed: int = 0) -> dict[str, Any]:
    """The ``quality`` metadata section measured on the first ``n`` cutouts of a training set, with the blend
    detector trained on them (:mod:`photoz.training.release.blend`) and its score's threshold."""
    import base64

    from photoz.training.fit.data import inspect
    from photoz.training.release.blend import train_blend_net
    from photoz.training.simulation.companions import COMPANION_DISTANCE_ARCSEC, COMPANION_FLUX_RATIO, add_companions

    info = inspect(data)
    n = min(n, info["n"])
    rng = np.random.default_rng(seed)
    parts, singles, blends = [], [], []
    for start in range(0, n, READ_BLOCK):  # a block at a time: 20,000 cutouts are 1.6 GB
        images, ebv = read_cutouts(data, min(READ_BLOCK, n - start), start)
        parts.append(cutout_features(images, ebv, BANDS, PIXEL_SCALE_ARCSEC))
        background = sky_background(images, PIXEL_SCALE_ARCSEC)[0]
        singles.append(blend_input(images, BANDS, PIXEL_SCALE_ARCSEC, background))
        rows = np.flatnonzero(np.isfinite(parts[-1]["r_mag"]))  # companions are scaled to a galaxy's flux
        if len(rows) > 1:
            blended, _ = add_companions(images[rows], parts[-1]["r_mag"][rows], background[rows], rng)
            blends.append(blend_input(blended, BANDS, PIXEL_SCALE_ARCSEC))
    features = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    reference = {"dataset": info["name"], "rows": f"first {n} of {info['n']}",
                 "simulator_version": info["simulator_version"], "seed": info["seed"]}
    reference = {k: v for k, v in reference.items() if v is not None}
    saturated = simulated_saturation(data, n) if info["simulator_version"] is not None else None
    if saturated is not None and saturated.any():
        # the saturation floor is the largest flat top among galaxies whose pixels are not saturated: the
        # simulator saturates bright stars and neighbours (and says so), which would raise it past what it catches
        features["plateau"] = np.where(saturated, 0, features["plateau"])
        reference["saturated_rows_excluded_from_plateau"] = int(saturated.sum())
    if not blends:
        return quality_metadata(features, reference)
    detector = train_blend_net(np.concatenate(singles), np.concatenate(blends), seed=seed)
    features["blend_score"] = BlendNet(detector).scores(np.concatenate(singles))
    blend_net = {"onnx_base64": base64.b64encode(detector).decode("ascii"),
                 "trained_on": f"the same {n} cutouts, each alone and with another of them added as a companion "
                               f"{COMPANION_DISTANCE_ARCSEC[0]:g}-{COMPANION_DISTANCE_ARCSEC[1]:g} arcsec away at "
                               f"{COMPANION_FLUX_RATIO[0]:g}-{COMPANION_FLUX_RATIO[1]:g} times its r flux",
                 "seed": seed}
    return quality_metadata(features, reference, blend_net=blend_net)


# --- injections: each takes the rows' cutouts, E(B-V), the thresholds, a generator and the rows' features
#     and returns new (images, ebv) and, optionally, {name: (per-object values, bin edges)} for the report to
#     break the intended flag's rate down by; INJECTIONS names the flag meant to catch them ---
