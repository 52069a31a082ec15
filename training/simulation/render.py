"""Render SDSS-like ugriz cutouts of a galaxy population with GalSim, and measure them.

Each galaxy is a de Vaucouleurs bulge plus an exponential disk with their
own colours, convolved with a per-object, per-band Moffat PSF, drawn on a
64 x 64 grid of 0.396" pixels in nanomaggies, with off-centre neighbours
(galaxies and stars), sky noise matched to the SDSS 5-sigma depths and
Poisson noise of the sources. A photometric pipeline then measures each
noisy cutout the way SDSS does: Petrosian radius on r (eta = 0.2), Petrosian
fluxes in every band through the same aperture, asinh magnitudes.
"""
from __future__ import annotations

import numpy as np

from photoz.model.conventions import (
    BANDS,
    CUTOUT_SIZE_PIXELS,
    MEDIAN_SEEING_FWHM_ARCSEC,
    PIXEL_SCALE_ARCSEC,
    dereddened,
    mag_to_nanomaggies,
    sky_level_nmgy_per_pixel,
)
from photoz.training.simulation.drawing import (
    PSFShape,
    bulge_half_light_radius,
    circular_growth,
    component_fluxes,
    draw_bands,
    galaxy_components,
    gsparams,
    resample_onto_reference,
)
from photoz.training.simulation.instrument import (
    FLAG_BAD_COLUMN,
    FLAG_CLOSE_NEIGHBOUR,
    FLAG_COSMIC_RAY_BAND_BIT,
    FLAG_SATURATED,
    InstrumentConfig,
    add_bad_columns,
    add_cosmic_rays,
    add_noise,
    band_values,
    neighbour_radius_arcsec,
    saturate,
    star_magnitudes,
)
from photoz.training.simulation.photometry import inner_radii, measure_catalogue, outer_radii
from photoz.training.simulation.population import NEIGHBOUR_Z_MAX, PopulationConfig, draw_candidates, fill

#: The per-object draws :func:`render_galaxies` returns, in the order the data sets record them (``truth_*``).
DRAWS = ("psf_fwhm_arcsec", "psf_shear", "offset_arcsec", "band_shift_pixels", "sky_sigma_nmgy", "sky_offset_nmgy",
         "n_neighbours", "nearest_neighbour_arcsec", "flags")


def render_galaxies(pop: dict, rng: np.random.Generator, inst: InstrumentConfig,
                    neighbour_pool: dict) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Noise-free cutouts (N, 5, 64, 64) in nanomaggies, each band on its own pixel grid; the noisy cutouts
    resampled onto the r band's grid; per-object draws (PSF, offsets, shifts, neighbours, sky noise); and the
    photometry's inputs, on each band's own grid: the noisy cutouts with the neighbours' light taken out
    (``deblended``: what an ideal deblender gives; SDSS deblends pairs down to ~1") and ``model_templates``
    (each galaxy's own noise-free profile in each band, scaled to a total flux of one: the fit of a perfect
    model magnitude), and the galaxy's light beyond the cutout for the growth curves (``outer``, with the sky's
    noise and offset in it; ``outer_clean`` without: :func:`outer_light`)."""
    n = pop["z"].size
    draws = _object_draws(n, rng, inst)
    noise_seeds = rng.integers(0, 2**31 - 1, n)
    scenes = _draw_scenes(pop, rng, inst, neighbour_pool, draws)
    clean, own = scenes["clean"], scenes["own"]
    noisy = add_noise(clean, np.random.default_rng(noise_seeds), draws["sky_sigma_nmgy"][:, :, None, None],
                      inst.gain_e_per_nmgy()[None, :, None, None])
    draws["sky_offset_nmgy"], draws["flags"] = _artefacts(noisy, rng, inst, draws, scenes)
    # the photometry is measured on each band's own pixel grid, as a pipeline measures each frame, with the
    # neighbours deblended; the cutouts then go onto the r grid
    crowded = np.flatnonzero(draws["n_neighbours"] > 0)
    measured = noisy.copy()
    measured[crowded] -= clean[crowded] - own[crowded]
    templates = own / np.maximum(scenes["own_flux"], 1e-30)[:, :, None, None].astype(np.float32)
    band_shifts = draws["band_shift_pixels"]
    moved = [b for b in range(len(BANDS)) if np.any(band_shifts[:, b])]
    if moved:  # onto the r grid, as ``photoz cutouts`` does with real frames (``clean`` stays on each band's own)
        part = noisy[:, moved]
        noisy[:, moved] = resample_onto_reference(part.reshape(-1, CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS),
                                                  band_shifts[:, moved].reshape(-1, 2)).reshape(part.shape)
    draws["nearest_neighbour_arcsec"] = scenes["nearest"]
    outer_clean = outer_light(pop)
    outer = outer_clean + outer_noise(outer_clean, np.random.default_rng(np.append(noise_seeds, 1)),
                                      draws["sky_sigma_nmgy"], draws["sky_offset_nmgy"], inst.gain_e_per_nmgy())
    types = {"n_neighbours": np.int16, "flags": np.int16}
    draws = {key: draws[key].astype(types.get(key, np.float32)) for key in DRAWS}
    return clean, noisy, draws, {"deblended": measured, "model_templates": templates, "outer": outer,
                                 "outer_clean": outer_clean}


def _beyond_edge(size: int) -> np.ndarray:
    """The cutout's inscribed radius followed by the photometry's radii beyond it (pixels)."""
    return np.concatenate([inner_radii(size)[-1:], outer_radii(size)])


def outer_light(pop: dict, size: int = CUTOUT_SIZE_PIXELS) -> np.ndarray:
    """Each galaxy's noise-free light (N, 5, R) in nanomaggies between the cutout's inscribed circle and each
    of the photometry's radii beyond it (``photometry.outer_radii``), from its bulge and disk profiles
    (``drawing.circular_growth``: the PSF left out, as it moves little light 12" from a galaxy's centre, and
    the centring offset, under 1.5 pixels at 32 pixels' radius). A pipeline measures a galaxy on its frame;
    the cutout holds only its inner 12.5", and half the MGS has two Petrosian radii beyond that."""
    radii = _beyond_edge(size)
    r50_pixels = np.maximum(np.asarray(pop["r50_arcsec"], np.float64), 0.05) / PIXEL_SCALE_ARCSEC
    bulge_flux, disk_flux = component_fluxes(pop["mag_bulge"], pop["mag_disk"], pop["bulge_fraction"])
    light = np.zeros((r50_pixels.size, len(BANDS), radii.size - 1))
    for flux, hlr, q, bulge in ((bulge_flux, bulge_half_light_radius(r50_pixels, pop["bulge_fraction"]),
                                 pop["bulge_q"], True), (disk_flux, r50_pixels, pop["disk_q"], False)):
        growth = circular_growth(radii, hlr, q, bulge)
        light += flux[:, :, None] * (growth[:, None, 1:] - growth[:, None, :1])
    return light


def outer_noise(light: np.ndarray, rng: np.random.Generator, sky_sigma: np.ndarray, sky_offset: np.ndarray,
                gain: np.ndarray, size: int = CUTOUT_SIZE_PIXELS) -> np.ndarray:
    """What a pipeline adds to ``light`` (:func:`outer_light`) in each annulus beyond the cutout: the sky's and
    the source's noise (sky noise ``sky_sigma`` (N, 5) per pixel, gain (5,) electrons per nanomaggy) and the
    sky-subtraction error ``sky_offset`` (N, 5) per pixel, summed outwards (N, 5, R), nanomaggies."""
    radii = _beyond_edge(size)
    annulus_pixels = np.pi * np.diff(radii**2)
    annulus_light = np.diff(np.concatenate([np.zeros_like(light[:, :, :1]), light], axis=2), axis=2)
    variance = annulus_pixels * sky_sigma[:, :, None] ** 2 + np.maximum(annulus_light, 0) / gain[None, :, None]
    per_annulus = rng.standard_normal(light.shape) * np.sqrt(variance) + annulus_pixels * sky_offset[:, :, None]
    return np.cumsum(per_annulus, axis=2)


def _object_draws(n: int, rng: np.random.Generator, inst: InstrumentConfig) -> dict[str, np.ndarray]:
    """Each object's PSF (per-band core FWHM, arcsec; shear), centring offset (arcsec), bands' shifts off the r
    grid (pixels), sky noise (nanomaggies per pixel) and number of neighbours."""
    fwhm_r = MEDIAN_SEEING_FWHM_ARCSEC["r"] * np.exp(rng.normal(0, inst.seeing_sigma_ln, n))
    fwhm = np.stack([fwhm_r * MEDIAN_SEEING_FWHM_ARCSEC[b] / MEDIAN_SEEING_FWHM_ARCSEC["r"]
                     * np.exp(rng.normal(0, inst.band_seeing_sigma_ln, n)) for b in BANDS], axis=1)
    psf_shear = rng.normal(0, inst.psf_shear_sigma, (n, 2))
    offsets = np.clip(rng.normal(0, inst.centring_sigma_pixels, (n, 2)), -1.5, 1.5) * PIXEL_SCALE_ARCSEC
    band_shifts = rng.uniform(-0.5, 0.5, (n, len(BANDS), 2))
    band_shifts[:, BANDS.index("r")] = 0.0  # the reference grid
    if not inst.resample_bands:
        band_shifts[:] = 0.0
    # sky brighter or darker than the median: its noise scales as the square root of its level
    sky_sigma = inst.sky_sigma_nmgy()[None, :] * 10 ** (-0.2 * rng.normal(0, inst.sky_brightness_sigma_mag,
                                                                            (n, len(BANDS))))
    return {"psf_fwhm_arcsec": fwhm, "psf_shear": psf_shear, "offset_arcsec": offsets,
            "band_shift_pixels": band_shifts, "sky_sigma_nmgy": sky_sigma,
            "n_neighbours": rng.poisson(inst.neighbours_per_cutout, n)}


def _neighbours(rng: np.random.Generator, inst: InstrumentConfig, count: int, pool: dict,
                pool_next: int) -> tuple[list, float, int]:
    """``count`` neighbours of one object, (kind, magnitudes or galaxy row, (x, y) arcsec), uniform in area
    between the deblending limit and beyond the cutout's edge; the nearest's distance; the next pool row."""
    neighbours, nearest = [], np.inf
    for _ in range(count):
        radius = float(neighbour_radius_arcsec(rng, inst))
        nearest = min(nearest, radius)
        angle = rng.uniform(0, 2 * np.pi)
        position = (radius * np.cos(angle), radius * np.sin(angle))
        if rng.uniform() < inst.neighbour_star_fraction:
            neighbours.append(("star", star_magnitudes(rng, 1)[0], position))
        else:
            neighbours.append(("galaxy", {key: v[pool_next % len(v)] for key, v in pool.items()}, position))
            pool_next += 1
    return neighbours, nearest, pool_next


def _draw_scenes(pop: dict, rng: np.random.Generator, inst: InstrumentConfig, pool: dict,
                 draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each object's noise-free scene (``clean``) and the galaxy alone (``own``), saturated, (N, 5, S, S); its
    own flux per band; the nearest neighbour's distance (arcsec) and whether the scene saturated."""
    import galsim

    n = pop["z"].size
    nearest, saturated = np.full(n, np.inf), np.zeros(n, bool)
    clean = np.zeros((n, len(BANDS), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS), np.float32)
    own, own_flux = np.zeros_like(clean), np.zeros((n, len(BANDS)))
    pool_next = 0
    for k in range(n):
        row = {key: value[k] for key, value in pop.items()}
        neighbours, nearest[k], pool_next = _neighbours(rng, inst, draws["n_neighbours"][k], pool, pool_next)
        components, fluxes = galaxy_components(galsim, row, *draws["offset_arcsec"][k])
        n_own = len(components)
        for kind, what, (x, y) in neighbours:
            if kind == "star":
                parts, part_fluxes = [galsim.DeltaFunction(gsparams=gsparams()).shift(x, y)], \
                    mag_to_nanomaggies(np.asarray(what))[:, None]
            else:
                parts, part_fluxes = galaxy_components(galsim, what, x, y)
            components += parts
            fluxes = np.concatenate([fluxes, part_fluxes], axis=1)
        shape = PSFShape(inst.psf_wing_fraction, inst.psf_wing_fwhm_ratio, *draws["psf_shear"][k])
        fwhm, shifts = draws["psf_fwhm_arcsec"][k], draws["band_shift_pixels"][k]
        if len(components) > n_own:
            clean[k], own[k] = draw_bands(components, fluxes, fwhm, shape, shifts, first_components=n_own)
            saturate(own[k], inst.saturation_nmgy_per_pixel)
        else:
            clean[k] = own[k] = draw_bands(components, fluxes, fwhm, shape, shifts)
        saturated[k] = saturate(clean[k], inst.saturation_nmgy_per_pixel).any()
        own_flux[k] = fluxes[:, :n_own].sum(axis=1)
    return {"clean": clean, "own": own, "own_flux": own_flux, "nearest": nearest, "saturated": saturated}


def _artefacts(noisy: np.ndarray, rng: np.random.Generator, inst: InstrumentConfig, draws: dict[str, np.ndarray],
               scenes: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sky-subtraction errors, cosmic rays and bad columns added to ``noisy`` in place: the sky offsets (N, 5)
    and the objects' artefact flags (``instrument.FLAG_*``)."""
    n = len(noisy)
    sky_level = band_values(sky_level_nmgy_per_pixel)
    sky_offset = rng.normal(0, inst.sky_offset_fraction, (n, len(BANDS))) * sky_level[None, :]
    noisy += sky_offset[:, :, None, None].astype(np.float32)
    cosmic = add_cosmic_rays(noisy, draws["sky_sigma_nmgy"], inst.cosmic_rays_per_band, rng)
    bad_columns = add_bad_columns(noisy, inst.bad_columns_per_band, rng)
    flags = (cosmic * np.array([FLAG_COSMIC_RAY_BAND_BIT[b] for b in BANDS])[None, :]).sum(axis=1)
    flags |= np.where(bad_columns.any(axis=1), FLAG_BAD_COLUMN, 0)
    flags |= np.where(scenes["nearest"] < inst.close_neighbour_arcsec, FLAG_CLOSE_NEIGHBOUR, 0)
    flags |= np.where(scenes["saturated"], FLAG_SATURATED, 0)
    return sky_offset, flags


#: The share of candidates a chunk's first round expects to pass the measured cut (0.985 measured with the reference
#: sample's completeness, 1.7.0 on; 0.84 without it); later rounds go by the chunk's own rate.
FIRST_ROUND_PASS_RATE = 0.98


def simulate_chunk(pop_cfg: PopulationConfig, inst: InstrumentConfig, seed: int, chunk: int,
                   n: int) -> dict[str, np.ndarray]:
    """All outputs for one chunk of n galaxies; a pure function of (configs, seed, chunk).

    Candidates (noise-free r within ``candidate_margin_mag`` of the limit) are rendered and measured, and
    those whose measured, dereddened Petrosian r passes the MGS limit are kept, round after round, until
    the chunk is full: the selection SDSS made, with its scatter and its dependence on profile. Each round
    renders about as many as the chunk still misses, at the pass rate (``FIRST_ROUND_PASS_RATE``, then the
    chunk's own)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    pool = draw_candidates(pop_cfg, 4 * n + 16, rng, r_limit=inst.neighbour_r_limit_mag, z_max=NEIGHBOUR_Z_MAX)
    r = BANDS.index("r")
    passed = [0, 0]  # candidates rendered and kept so far in this chunk

    def batch(missing: int):
        # as many candidates as should fill the chunk at the pass rate seen so far: every candidate rendered
        # beyond the chunk's size is wasted work (1.7.0 drew 1.1 x the missing number, a tenth too many)
        rate = passed[1] / passed[0] if passed[1] else FIRST_ROUND_PASS_RATE
        pop = draw_candidates(pop_cfg, int(missing / max(rate, 0.5)) + 2, rng)
        _, noisy, draws, measured = render_galaxies(pop, rng, inst, pool)
        catalogue = measure_catalogue(measured["deblended"], draws["sky_sigma_nmgy"], inst.gain_e_per_nmgy(),
                                      measured["model_templates"], measured["outer"])
        out = {"images": noisy, "z": pop["z"].astype(np.float64), "ebv": pop["ebv"].astype(np.float32)}
        out.update({f"truth_{k}": v for k, v in pop.items() if k not in ("z", "ebv")})
        out["cat_flags"] = draws.pop("flags")  # what the pipeline knows: interpolated pixels, close neighbours
        out.update({f"truth_{k}": v for k, v in draws.items()})
        out.update({f"cat_{k}": v for k, v in catalogue.items()})
        keep = dereddened(catalogue["petro_mag"], ebv=pop["ebv"])[:, r] <= pop_cfg.r_limit_mag
        passed[0], passed[1] = passed[0] + keep.size, passed[1] + int(keep.sum())
        return out, keep

    return fill(n, batch)
