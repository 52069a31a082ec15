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

import functools
from dataclasses import asdict, dataclass

import numpy as np

from photoz.model.conventions import (
    ASINH_SOFTENING_MAGGIES,
    BANDS,
    CUTOUT_SIZE_PIXELS,
    MEDIAN_SEEING_FWHM_ARCSEC,
    PIXEL_SCALE_ARCSEC,
    PSF_MOFFAT_BETA,
    asinh_mag,
    effective_gain_e_per_nmgy,
    mag_to_nanomaggies,
    sky_sigma_nmgy_per_pixel,
)
from photoz.training.sim.population import PopulationConfig, draw_candidates, draw_selected

PETROSIAN_ETA = 0.2
#: Looser than GalSim's defaults (folding 5e-3): flux lost to aliasing stays
#: below 1%, far under the sky noise of a cutout, and drawing is ~2x faster.
GSPARAMS = {"folding_threshold": 1e-2, "maxk_threshold": 3e-3}


@dataclass(frozen=True)
class InstrumentConfig:
    seeing_sigma_ln: float = 0.15  # scatter of the r-band FWHM around the SDSS median
    band_seeing_sigma_ln: float = 0.03  # extra per-band scatter
    centring_sigma_pixels: float = 0.5
    neighbours_per_cutout: float = 0.3  # Poisson mean: ~6000 objects/deg^2 to r = 22
    neighbour_star_fraction: float = 0.35
    neighbour_r_limit_mag: float = 22.0
    neighbour_min_distance_arcsec: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)


def star_magnitudes(rng: np.random.Generator, n: int) -> np.ndarray:
    """ugriz of field stars along a simple stellar locus, r between 15 and 22."""
    s = rng.uniform(0, 1, n)  # 0 = F/G, 1 = M
    r = 22.0 - rng.exponential(2.0, n).clip(0, 7)
    g = r + 0.25 + 1.2 * s
    u = g + 0.9 + 1.4 * s - 0.6 * s**2
    i = r - 0.05 - 1.0 * s**2
    z = i - 0.02 - 0.5 * s**2
    return np.stack([u, g, r, i, z], axis=1)


@functools.lru_cache(maxsize=1)
def _gsparams():
    """One GSParams for every profile (shared, so GalSim never copies profiles to apply it)."""
    import warnings

    import galsim

    # GalSim notes when a truncated profile falls back from real-space to DFT
    # convolution; that is the method we want, so the note is noise (set once per process)
    warnings.filterwarnings("ignore", message=".*real space convolution.*", category=galsim.GalSimWarning)
    return galsim.GSParams(**GSPARAMS)


def draw(profiles: list, psf_fwhm_arcsec: float) -> np.ndarray:
    """Sum of GalSim profiles (flux in nanomaggies, positions in arcsec from the centre)
    seen through a Moffat PSF, drawn (with the pixel response) on the cutout grid.

    One band with GalSim's own ``drawImage``: the reference ``draw_bands`` is tested against,
    and the way to draw a single stamp (stars for PSF checks)."""
    import galsim

    gsparams = _gsparams()
    psf = galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=psf_fwhm_arcsec, gsparams=gsparams)
    image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=PIXEL_SCALE_ARCSEC)
    galsim.Convolve(galsim.Add(profiles), psf, gsparams=gsparams).drawImage(image=image, method="auto")
    return image.array


def draw_bands(components: list, fluxes_nmgy: np.ndarray, psf_fwhm_arcsec) -> np.ndarray:
    """Cutouts (n_bands, S, S): unit-flux GalSim components (positions in arcsec from the centre) with
    per-band fluxes ``fluxes_nmgy`` (n_bands, n_components), each band seen through its own Moffat PSF.

    The same pixels as ``draw(profiles_of_band_b, fwhm_b)`` for every band (GalSim FFT drawing with the
    pixel response, up to GalSim's folding and k-range accuracy), at a fraction of the cost: each
    component's Fourier image is drawn once per object instead of once per band, on the k-grid that the
    most demanding band needs (the widest PSF sets the real-space size, the narrowest the k range), and
    only the PSF changes between bands. This is GalSim's own split of ``drawFFT`` into
    ``drawFFT_makeKImage``, the profiles' k-images and ``drawFFT_finish``, which its documentation
    suggests for reusing k-images.
    """
    import galsim

    gsparams = _gsparams()
    inverse_scale = 1.0 / PIXEL_SCALE_ARCSEC
    # image coordinates (pixels); origin on the cutout's true centre, half a pixel off the integer centre
    shapes = [c.dilate(inverse_scale).shift(-0.5, -0.5) for c in components]
    psfs = [galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=float(f) * inverse_scale, gsparams=gsparams)
            for f in psf_fwhm_arcsec]
    pixel = galsim.Pixel(1.0, gsparams=gsparams)
    image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=1.0)
    image.setCenter(0, 0)
    total = galsim.Add(shapes, gsparams=gsparams)
    widths = np.asarray(psf_fwhm_arcsec, dtype=float)
    grids = [galsim.Convolve(total, psfs[b], pixel, gsparams=gsparams).drawFFT_makeKImage(image)
             for b in sorted({int(widths.argmax()), int(widths.argmin())})]
    kimage = max((g[0] for g in grids), key=lambda k: k.array.size)
    wrap = max(g[1] for g in grids)

    def k_array(profile) -> np.ndarray:
        profile._drawKImage(kimage)
        return kimage.array.copy()

    component_k = np.stack([k_array(s) for s in shapes])  # (n_components, ky, kx)
    pixel_k = k_array(pixel)
    out = np.empty((len(psfs), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS), np.float32)
    fluxes = np.asarray(fluxes_nmgy, dtype=np.float32)
    for b, psf in enumerate(psfs):
        psf._drawKImage(kimage)
        scene = fluxes[b, 0] * component_k[0]  # a few multiply-adds: no BLAS call (its threads fight workers)
        for flux, k_image in zip(fluxes[b, 1:], component_k[1:], strict=True):
            scene += flux * k_image
        kimage.array[...] *= scene * pixel_k
        total.drawFFT_finish(image, kimage, wrap, add_to_image=False)
        out[b] = image.array
    return out


def _galaxy_components(galsim, row: dict, dx_arcsec: float, dy_arcsec: float) -> tuple[list, np.ndarray]:
    """Unit-flux bulge and disk profiles of a galaxy and their fluxes (n_bands, n_components) in nanomaggies."""
    r50 = max(float(row["r50_arcsec"]), 0.05)
    beta = float(row["position_angle_deg"]) * galsim.degrees
    parts, fluxes = [], []
    if row["bulge_fraction"] > 0.01:
        bulge_hlr = r50 * (1.0 if row["bulge_fraction"] > 0.8 else 0.6)
        parts.append(galsim.DeVaucouleurs(half_light_radius=bulge_hlr, trunc=8 * bulge_hlr, gsparams=_gsparams())
                     .shear(q=float(row["bulge_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(mag_to_nanomaggies(np.asarray(row["mag_bulge"])))
    if row["bulge_fraction"] < 0.99:
        parts.append(galsim.Exponential(half_light_radius=r50, gsparams=_gsparams())
                     .shear(q=float(row["disk_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(mag_to_nanomaggies(np.asarray(row["mag_disk"])))
    return parts, np.stack(fluxes, axis=1)


def _galaxy_profile(galsim, row: dict, band_index: int, dx_arcsec: float, dy_arcsec: float):
    """The galaxy in one band: bulge + disk with that band's fluxes (nanomaggies)."""
    parts, fluxes = _galaxy_components(galsim, row, dx_arcsec, dy_arcsec)
    return galsim.Add([p * float(f) for p, f in zip(parts, fluxes[band_index], strict=True)])


def render_galaxies(pop: dict, rng: np.random.Generator, inst: InstrumentConfig,
                    neighbour_pool: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Noise-free and noisy cutouts (N, 5, 64, 64) in nanomaggies, plus per-object draws."""
    import galsim

    n = pop["z"].size
    size, scale = CUTOUT_SIZE_PIXELS, PIXEL_SCALE_ARCSEC
    fwhm_r = MEDIAN_SEEING_FWHM_ARCSEC["r"] * np.exp(rng.normal(0, inst.seeing_sigma_ln, n))
    fwhm = np.stack([fwhm_r * MEDIAN_SEEING_FWHM_ARCSEC[b] / MEDIAN_SEEING_FWHM_ARCSEC["r"]
                     * np.exp(rng.normal(0, inst.band_seeing_sigma_ln, n)) for b in BANDS], axis=1)
    offsets = np.clip(rng.normal(0, inst.centring_sigma_pixels, (n, 2)), -1.5, 1.5) * scale
    n_neigh = rng.poisson(inst.neighbours_per_cutout, n)
    clean = np.zeros((n, len(BANDS), size, size), np.float32)
    noise_seeds = rng.integers(0, 2**31 - 1, n)
    pool_next = 0
    for k in range(n):
        row = {key: value[k] for key, value in pop.items()}
        neighbours = []
        for _ in range(n_neigh[k]):
            radius = rng.uniform(inst.neighbour_min_distance_arcsec, size * scale / 2 * 1.3)
            angle = rng.uniform(0, 2 * np.pi)
            position = (radius * np.cos(angle), radius * np.sin(angle))
            if rng.uniform() < inst.neighbour_star_fraction:
                neighbours.append(("star", star_magnitudes(rng, 1)[0], position))
            else:
                neighbours.append(("galaxy", {key: v[pool_next % v.size] for key, v in neighbour_pool.items()},
                                   position))
                pool_next += 1
        components, fluxes = _galaxy_components(galsim, row, *offsets[k])
        for kind, what, (x, y) in neighbours:
            if kind == "star":
                parts, part_fluxes = [galsim.DeltaFunction(gsparams=_gsparams()).shift(x, y)], \
                    mag_to_nanomaggies(np.asarray(what))[:, None]
            else:
                parts, part_fluxes = _galaxy_components(galsim, what, x, y)
            components += parts
            fluxes = np.concatenate([fluxes, part_fluxes], axis=1)
        clean[k] = draw_bands(components, fluxes, fwhm[k])
    noisy = add_noise(clean, np.random.default_rng(noise_seeds))
    draws = {"psf_fwhm_arcsec": fwhm.astype(np.float32), "offset_arcsec": offsets.astype(np.float32),
             "n_neighbours": n_neigh.astype(np.int16)}
    return clean, noisy, draws


def noise_sigma(clean: np.ndarray) -> np.ndarray:
    """Per-pixel noise (nanomaggies): sky + read noise at the depth, plus source Poisson."""
    sky = np.array([sky_sigma_nmgy_per_pixel(b) for b in BANDS])[None, :, None, None]
    gain = np.array([effective_gain_e_per_nmgy(b) for b in BANDS])[None, :, None, None]
    # sqrt(sky^2 + max(clean, 0) / gain) in float64, computed in place (same numbers, no temporaries)
    sigma = np.empty(clean.shape, np.float64)
    np.divide(np.maximum(clean, 0), gain, out=sigma)
    np.add(sky**2, sigma, out=sigma)
    return np.sqrt(sigma, out=sigma)


def add_noise(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=clean.shape)
    np.multiply(noise, noise_sigma(clean), out=noise)
    np.add(clean, noise, out=noise)
    return noise.astype(np.float32)


def _radial_profile(images: np.ndarray, radii: np.ndarray):
    """Cumulative flux and pixel area within each radius (about the cutout centre)."""
    size = images.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    rpix = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2).ravel()
    inside = rpix[None, :] <= radii[:, None]  # (R, P)
    flux = images.reshape(images.shape[0], -1) @ inside.T.astype(np.float64)  # (N, R)
    return flux, inside.sum(axis=1).astype(np.float64)


def measure_catalogue(noisy: np.ndarray) -> dict[str, np.ndarray]:
    """SDSS-style Petrosian photometry of noisy cutouts (N, 5, S, S) in nanomaggies."""
    n, _, size, _ = noisy.shape
    r_band = BANDS.index("r")
    radii = np.arange(1.0, size / 2, 0.5)
    flux_r, area = _radial_profile(noisy[:, r_band], radii)
    # Petrosian ratio: surface brightness in the annulus 0.8R..1.25R over the mean within R
    f_lo = np.array([np.interp(0.8 * radii, radii, f) for f in flux_r])
    f_hi = np.array([np.interp(np.minimum(1.25 * radii, radii[-1]), radii, f) for f in flux_r])
    a_lo, a_hi = np.interp(0.8 * radii, radii, area), np.interp(np.minimum(1.25 * radii, radii[-1]), radii, area)
    ratio = ((f_hi - f_lo) / np.maximum(a_hi - a_lo, 1)) / np.maximum(flux_r / area, 1e-12)
    below = (ratio < PETROSIAN_ETA) & (radii[None, :] > 1.5)
    r_petro = np.where(below.any(axis=1), radii[np.argmax(below, axis=1)], radii[-1])
    aperture = np.minimum(2 * r_petro, size / 2 - 1)
    fluxes, errors = np.empty((n, len(BANDS))), np.empty((n, len(BANDS)))
    for b, band in enumerate(BANDS):
        flux_b, _ = _radial_profile(noisy[:, b], radii)
        fluxes[:, b] = [np.interp(a, radii, f) for a, f in zip(aperture, flux_b, strict=True)]
        n_pix = np.pi * aperture**2
        errors[:, b] = np.sqrt(n_pix * sky_sigma_nmgy_per_pixel(band) ** 2
                               + np.maximum(fluxes[:, b], 0) / effective_gain_e_per_nmgy(band))
    # half-light radius: radius enclosing half the Petrosian flux in r (on the
    # running maximum of the growth curve, which noise can make dip)
    r50 = np.array([np.interp(0.5 * ft, f, radii)
                    for ft, f in zip(fluxes[:, r_band], np.maximum.accumulate(flux_r, axis=1), strict=True)])
    model_flux, model_err = _template_photometry(noisy, aperture)
    out = {
        "petro_r50_arcsec": (r50 * PIXEL_SCALE_ARCSEC).astype(np.float32),
        "petro_rad_arcsec": (r_petro * PIXEL_SCALE_ARCSEC).astype(np.float32),
    }
    for kind, flux, err in (("petro", fluxes, errors), ("model", model_flux, model_err)):
        out[f"{kind}_flux_nmgy"], out[f"{kind}_flux_err_nmgy"] = flux.astype(np.float32), err.astype(np.float32)
        out[f"{kind}_mag"], out[f"{kind}_mag_err"] = (x.astype(np.float32) for x in _asinh_mags(flux, err))
    return out


def _asinh_mags(flux: np.ndarray, err: np.ndarray):
    softening_nmgy = np.array([1e9 * ASINH_SOFTENING_MAGGIES[b] for b in BANDS])
    mags = np.stack([asinh_mag(flux[:, b], band) for b, band in enumerate(BANDS)], axis=1)
    return mags, 2.5 / np.log(10) * err / np.hypot(flux, 2 * softening_nmgy)


def _template_photometry(noisy: np.ndarray, aperture_pixels: np.ndarray):
    """"Model" fluxes: every band fitted with the galaxy's own light profile.

    Like SDSS model magnitudes (one profile, refitted in amplitude in each
    band), the weights follow the galaxy's light, so colours are measured at
    far better signal-to-noise than in the large Petrosian aperture. The
    template is the smoothed g + r + i stack inside the Petrosian aperture,
    leaving out the band being measured so that its noise does not bias its
    own flux; the flux is the template's fitted amplitude times its total.
    """
    n, n_bands, size, _ = noisy.shape
    yy, xx = np.mgrid[:size, :size]
    inside = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2)[None] <= aperture_pixels[:, None, None]
    stack_bands = [BANDS.index(b) for b in ("g", "r", "i")]
    sky = np.array([sky_sigma_nmgy_per_pixel(b) for b in BANDS])
    gain = np.array([effective_gain_e_per_nmgy(b) for b in BANDS])
    flux, err = np.empty((n, n_bands)), np.empty((n, n_bands))
    for b in range(n_bands):
        image = noisy[:, [c for c in stack_bands if c != b]].sum(axis=1)
        smooth = (image + np.roll(image, 1, 1) + np.roll(image, -1, 1) + np.roll(image, 1, 2)
                  + np.roll(image, -1, 2)) / 5
        template = np.clip(smooth, 0, None) * inside
        t_sum = template.sum(axis=(1, 2))
        t_sq = np.maximum((template**2).sum(axis=(1, 2)), 1e-20)
        flux[:, b] = np.einsum("nyx,nyx->n", noisy[:, b], template) / t_sq * t_sum
        err[:, b] = np.sqrt(sky[b] ** 2 * t_sum**2 / t_sq + np.maximum(flux[:, b], 0) / gain[b])
    return flux, err


def simulate_chunk(pop_cfg: PopulationConfig, inst: InstrumentConfig, seed: int, chunk: int,
                   n: int) -> dict[str, np.ndarray]:
    """All outputs for one chunk of n galaxies; a pure function of (configs, seed, chunk)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    pop = draw_selected(pop_cfg, n, rng)
    pool = draw_candidates(pop_cfg, 4 * n + 16, rng, r_limit=inst.neighbour_r_limit_mag)
    keep = pool["mag_true"][:, BANDS.index("r")] < inst.neighbour_r_limit_mag
    pool = {k: v[keep] for k, v in pool.items()}
    _, noisy, draws = render_galaxies(pop, rng, inst, pool)
    out = {"images": noisy, "z": pop["z"].astype(np.float64), "ebv": pop["ebv"].astype(np.float32)}
    out.update({f"truth_{k}": v for k, v in pop.items() if k not in ("z", "ebv")})
    out.update({f"truth_{k}": v for k, v in draws.items()})
    out.update({f"cat_{k}": v for k, v in measure_catalogue(noisy).items()})
    return out
