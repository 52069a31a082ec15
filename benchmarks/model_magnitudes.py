"""Would SDSS-style model magnitudes weaken the simulator's catalogue baseline? Same galaxies, same pixels.

    python -m benchmarks.model_magnitudes [--n 1000] [--seeds 3]

The simulator measures model magnitudes with each galaxy's own noise-free profile in each band (its bulge
and disk at that band's colours, through that band's PSF): a perfect fit. SDSS fits one profile in r and
scales it, through each band's PSF, to every band (Stoughton et al. 2002), so a galaxy whose bulge and disk
differ in colour gets model colours weighted by its r-band light. This renders fresh simulated galaxies
(1.6.0 settings, Main Galaxy Sample cut), draws each one's r-band profile through every band's PSF beside
the simulator's own templates, fits both to the same deblended noisy pixels, and compares: the colour
shifts (SDSS-style minus perfect, median and robust sigma per colour, with the photometric noise of that
colour for scale) and a kNN on dereddened model magnitudes trained on three quarters, tested on the rest.
Prints a table, writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from photoz.model.conventions import BANDS, dereddened  # noqa: E402
from photoz.model.pdf import photoz_metrics  # noqa: E402
from photoz.training.baselines import KNNPhotoZ  # noqa: E402
from photoz.training.simulation import render  # noqa: E402
from photoz.training.simulation.population import NEIGHBOUR_Z_MAX, PopulationConfig, draw_candidates  # noqa: E402

R = BANDS.index("r")


def render_with_r_profile_templates(n: int, seed: int, edit: Callable[[dict], None] | None = None,
                                    select: bool = True) -> dict[str, np.ndarray]:
    """Render n candidates; beside the simulator's templates, each galaxy's r-band profile through every band.
    Model magnitudes fitted with each (``perfect``, ``sdss``) for the galaxies that pass the MGS cut (all of
    them without ``select``); ``edit`` may change the drawn population in place before it is rendered."""
    r_profile_templates: list[np.ndarray] = []
    draw_bands = render.draw_bands

    def drawing(components, fluxes, fwhm, shape=None, shifts=None, first_components=None):
        own = first_components if first_components is not None else len(components)
        r_fluxes = np.asarray(fluxes, dtype=np.float64)[R, :own]
        unit = np.repeat((r_fluxes / r_fluxes.sum())[None, :], len(BANDS), axis=0)
        r_profile_templates.append(draw_bands(components[:own], unit, fwhm, shape, shifts))
        return draw_bands(components, fluxes, fwhm, shape, shifts, first_components)

    pop_cfg, inst = PopulationConfig(), render.InstrumentConfig()
    rng = np.random.default_rng(seed)
    pool = draw_candidates(pop_cfg, 4 * n + 16, rng, r_limit=inst.neighbour_r_limit_mag, z_max=NEIGHBOUR_Z_MAX)
    pop = draw_candidates(pop_cfg, n, rng)
    if edit is not None:
        edit(pop)
    render.draw_bands = drawing
    try:
        _, _, draws, measured = render.render_galaxies(pop, rng, inst, pool)
    finally:
        render.draw_bands = draw_bands
    sky, gain = draws["sky_sigma_nmgy"], inst.gain_e_per_nmgy()
    perfect = render.measure_catalogue(measured["deblended"], sky, gain, measured["model_templates"])
    sdss = render.measure_catalogue(measured["deblended"], sky, gain, np.stack(r_profile_templates))
    keep = dereddened(perfect["petro_mag"], ebv=pop["ebv"])[:, R] <= pop_cfg.r_limit_mag if select else slice(None)
    return {"z": pop["z"][keep], "ebv": pop["ebv"][keep], "perfect": perfect["model_mag"][keep],
            "sdss": sdss["model_mag"][keep], "perfect_err": perfect["model_mag_err"][keep]}


def knn_scores(mags: np.ndarray, ebv: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """kNN (the catalogue baseline's) median neighbour redshift, trained on the first three quarters."""
    train = np.arange(z.size) < int(0.75 * z.size)
    features = dereddened(mags, ebv=ebv)
    knn = KNNPhotoZ().fit(features[train], z[train])
    return photoz_metrics(np.median(knn.neighbour_redshifts(features[~train]), axis=1), z[~train])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="candidates rendered per seed (most pass the MGS cut)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parts = [render_with_r_profile_templates(args.n, 1000 + s) for s in range(args.seeds)]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    shift = np.diff(data["sdss"], axis=1) - np.diff(data["perfect"], axis=1)
    colour_noise = np.hypot(data["perfect_err"][:, :-1], data["perfect_err"][:, 1:])
    colours = [f"{a}-{b}" for a, b in zip(BANDS[:-1], BANDS[1:], strict=True)]
    result = {
        "n_galaxies": int(data["z"].size), "seconds": round(time.perf_counter() - start, 1),
        "colour_shift_median_mag": dict(zip(colours, np.median(shift, axis=0).round(5).tolist(), strict=True)),
        "colour_shift_robust_sigma_mag": dict(zip(colours, (1.4826 * np.median(
            np.abs(shift - np.median(shift, axis=0)), axis=0)).round(5).tolist(), strict=True)),
        "colour_noise_median_mag": dict(zip(colours, np.median(colour_noise, axis=0).round(4).tolist(), strict=True)),
        "knn_perfect_fit": knn_scores(data["perfect"], data["ebv"], data["z"]),
        "knn_sdss_style": knn_scores(data["sdss"], data["ebv"], data["z"]),
    }
    print(f"{result['n_galaxies']} galaxies past the MGS cut ({result['seconds']} s)")
    print(f"{'colour':>8} {'shift median':>13} {'shift sigma':>12} {'noise':>7}")
    for c in colours:
        median, sigma = result["colour_shift_median_mag"][c], result["colour_shift_robust_sigma_mag"][c]
        print(f"{c:>8} {median:>13.4f} {sigma:>12.4f} {result['colour_noise_median_mag'][c]:>7.4f}")
    for name in ("knn_perfect_fit", "knn_sdss_style"):
        s = result[name]
        print(f"{name:>16}: sigma_MAD {s['sigma_mad']:.4f}, outliers {100 * s['outlier_fraction']:.2f}% "
              f"({s['n']} test galaxies)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"model-magnitudes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
