"""The simulated photometric pipeline: Petrosian radii, fluxes and errors as SDSS measures them, and model fluxes
fitted with each galaxy's own profile; asinh magnitudes."""
from __future__ import annotations

import numpy as np

from photoz.model.conventions import (
    ASINH_SOFTENING_MAGGIES,
    BANDS,
    PIXEL_SCALE_ARCSEC,
    asinh_mag,
)

PETROSIAN_ETA = 0.2
#: The growth curves' step (pixels)
RADIUS_STEP_PIXELS = 0.5
#: The largest radius the photometry reaches (pixels; 50.7"): apertures of two Petrosian radii up to 25", past
#: the real MGS's 99th percentile Petrosian radius (21.8" in DR18). A pipeline measures the whole frame; light
#: beyond the cutout's inscribed circle comes in as ``outer`` (:func:`outer_radii`)
MAX_RADIUS_PIXELS = 128.0


def inner_radii(size: int) -> np.ndarray:
    """The growth curve's radii (pixels) within a cutout of ``size`` pixels: its inscribed circle."""
    return np.arange(1.0, size / 2, RADIUS_STEP_PIXELS)


def outer_radii(size: int) -> np.ndarray:
    """The growth curve's radii (pixels) beyond a cutout of ``size`` pixels, to ``MAX_RADIUS_PIXELS``."""
    return np.arange(inner_radii(size)[-1] + RADIUS_STEP_PIXELS, MAX_RADIUS_PIXELS + 1e-9, RADIUS_STEP_PIXELS)


def radial_profile(images: np.ndarray, radii: np.ndarray):
    """Cumulative flux and pixel area within each radius (about the cutout centre)."""
    size = images.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    rpix = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2).ravel()
    inside = rpix[None, :] <= radii[:, None]  # (R, P)
    flux = images.reshape(images.shape[0], -1) @ inside.T.astype(np.float64)  # (N, R)
    return flux, inside.sum(axis=1).astype(np.float64)


def measure_catalogue(noisy: np.ndarray, sky_sigma: np.ndarray, gain: np.ndarray,
                      model_templates: np.ndarray, outer: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """SDSS-style photometry of noisy cutouts (N, 5, S, S) in nanomaggies, whose per-pixel sky noise is
    ``sky_sigma`` (N, 5) and gain ``gain`` (5,) electrons per nanomaggy: the errors a pipeline would quote
    from its own noise model. Petrosian fluxes in every band within two r-band Petrosian radii; model fluxes
    fitted with ``model_templates`` (N, 5, S, S: each galaxy's noise-free profile in each band through that
    band's PSF, scaled to unit total flux), as SDSS fits a profile convolved with each band's PSF (a perfect
    fit: the profile is the true one, so colour gradients do not shift model colours).

    ``outer`` (N, 5, R) is each galaxy's light between the cutout's inscribed circle and each of
    :func:`outer_radii` (nanomaggies; noise and sky errors included if the caller adds them): the growth curves
    go on beyond the cutout, as a pipeline's do on the frame. Without it they stop at the cutout's edge, and a
    galaxy whose two Petrosian radii reach past it (about half the MGS: its median Petrosian radius, 6.2", is
    the 64-pixel cutout's quarter-width) loses the light outside (simulators before 1.10.0)."""
    n, _, size, _ = noisy.shape
    r_band = BANDS.index("r")
    inner = radii = inner_radii(size)

    def growth(band: int, within_cutout: np.ndarray) -> np.ndarray:
        """A band's growth curve within the cutout, continued with ``outer`` when there is one."""
        if outer is None:
            return within_cutout
        return np.concatenate([within_cutout, within_cutout[:, -1:] + outer[:, band]], axis=1)

    flux_r, area = radial_profile(noisy[:, r_band], inner)
    flux_r = growth(r_band, flux_r)
    if outer is not None:
        beyond = outer_radii(size)
        area = np.concatenate([area, area[-1] + np.pi * (beyond**2 - inner[-1] ** 2)])
        radii = np.concatenate([inner, beyond])
    # Petrosian ratio: surface brightness in the annulus 0.8R..1.25R over the mean within R
    f_lo = np.array([np.interp(0.8 * radii, radii, f) for f in flux_r])
    f_hi = np.array([np.interp(np.minimum(1.25 * radii, radii[-1]), radii, f) for f in flux_r])
    a_lo, a_hi = np.interp(0.8 * radii, radii, area), np.interp(np.minimum(1.25 * radii, radii[-1]), radii, area)
    ratio = ((f_hi - f_lo) / np.maximum(a_hi - a_lo, 1)) / np.maximum(flux_r / area, 1e-12)
    below = (ratio < PETROSIAN_ETA) & (radii[None, :] > 1.5)
    r_petro = np.where(below.any(axis=1), radii[np.argmax(below, axis=1)], radii[-1])
    aperture = np.minimum(2 * r_petro, radii[-1] if outer is not None else size / 2 - 1)
    fluxes, errors = np.empty((n, len(BANDS))), np.empty((n, len(BANDS)))
    for b in range(len(BANDS)):
        flux_b = flux_r if b == r_band else growth(b, radial_profile(noisy[:, b], inner)[0])
        fluxes[:, b] = [np.interp(a, radii, f) for a, f in zip(aperture, flux_b, strict=True)]
        n_pix = np.pi * aperture**2
        errors[:, b] = np.sqrt(n_pix * sky_sigma[:, b] ** 2 + np.maximum(fluxes[:, b], 0) / gain[b])
    # half-light radius: radius enclosing half the Petrosian flux in r (on the
    # running maximum of the growth curve, which noise can make dip)
    r50 = np.array([np.interp(0.5 * ft, f, radii)
                    for ft, f in zip(fluxes[:, r_band], np.maximum.accumulate(flux_r, axis=1), strict=True)])
    model_flux, model_err = _model_fit_photometry(noisy, model_templates, sky_sigma, gain)
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


def _model_fit_photometry(noisy: np.ndarray, templates: np.ndarray, sky: np.ndarray, gain: np.ndarray):
    """Amplitude of templates of unit total flux (N, 5, S, S) fitted to the images by least squares with
    uniform (sky-dominated) weights: the total flux, and its error from the sky and the source's Poisson noise."""
    t_sq = np.maximum(np.einsum("nbyx,nbyx->nb", templates, templates, dtype=np.float64), 1e-20)
    flux = np.einsum("nbyx,nbyx->nb", noisy, templates, dtype=np.float64) / t_sq
    err = np.sqrt(sky**2 / t_sq + np.maximum(flux, 0) / gain[None, :])
    return flux, err
