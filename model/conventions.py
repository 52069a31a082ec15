"""The one place for photoz's astronomical conventions.

Band order, cutout geometry, pixel units, extinction coefficients, survey
depths and the default redshift grid live here and nowhere else. Training,
simulation and serving all read them from this module (serving reads them
through the bundle metadata, which is written from these values).
"""
from __future__ import annotations

import math
from typing import Any

#: SDSS band order: the channel order of every cutout tensor.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z")

#: Cutout side length, pixels.
CUTOUT_SIZE_PIXELS: int = 64

#: Axis of the bands in a cutout stack: channel first (N, bands, S, S) is the canonical
#: layout; channel last (N, S, S, bands) is the layout of Pasquet et al.'s data.
CHANNEL_FIRST_AXIS, CHANNEL_LAST_AXIS = 1, 3


def stack_band_axis(shape: tuple[int, ...], n_bands: int = len(BANDS), size: int = CUTOUT_SIZE_PIXELS) -> int | None:
    """Which axis of a stack of shape (N, ., ., .) holds the bands (found by its length), or None."""
    if len(shape) != 4:
        return None
    if shape[1] == n_bands and shape[2:] == (size, size):
        return CHANNEL_FIRST_AXIS
    if shape[3] == n_bands and shape[1:3] == (size, size):
        return CHANNEL_LAST_AXIS
    return None

#: SDSS pixel scale, arcsec per pixel.
PIXEL_SCALE_ARCSEC: float = 0.396

#: Unit of pixel values: SDSS nanomaggies, m = 22.5 - 2.5 log10(f).
FLUX_UNIT: str = "nanomaggy"

#: AB magnitude of a flux of one nanomaggy.
NANOMAGGY_ZEROPOINT_MAG: float = 22.5

#: The largest pixel value, in magnitude, that can be a measured flux, nanomaggies: all the light of the
#: brightest star in the night sky (Sirius, V = -1.46 mag: 10**((22.5 + 1.46) / 2.5) ~ 3.8e9 nmgy) in one pixel,
#: rounded up. A real cutout, saturated stars included, stays far below it (SDSS pixels saturate near 1e3 nmgy);
#: mask sentinels (1e30, float32's maximum 3.4e38, their negatives) lie far above it, and so does the range where
#: the network's arithmetic overflows float32. A pixel beyond it is refused per object, before batching.
MAX_ABS_PIXEL_NMGY: float = 1e10

#: One nanomaggy in jansky: the AB zero point 3631 Jy times 1e-9.
NANOMAGGY_JANSKY: float = 3631e-9

#: Milky Way extinction A_band / E(B-V) for SDSS ugriz
#: (Schlafly & Finkbeiner 2011, R_V = 3.1).
EXTINCTION_A_OVER_EBV: dict[str, float] = {
    "u": 4.239, "g": 3.303, "r": 2.285, "i": 1.698, "z": 1.263,
}

#: SDSS 5-sigma point-source depths, AB mag (York et al. 2000).
DEPTH_5SIGMA_MAG: dict[str, float] = {
    "u": 22.0, "g": 22.2, "r": 22.2, "i": 21.3, "z": 20.5,
}

#: Median SDSS seeing (PSF FWHM), arcsec, per band.
MEDIAN_SEEING_FWHM_ARCSEC: dict[str, float] = {
    "u": 1.55, "g": 1.45, "r": 1.35, "i": 1.30, "z": 1.30,
}

#: Moffat index of the PSF model used for simulation and depth bookkeeping
#: (a Moffat with beta ~ 3.5 describes the SDSS PSF core and wings).
PSF_MOFFAT_BETA: float = 3.5

#: Default redshift grid of the PDF: 180 equal bins over 0 <= z < 0.4
#: (Pasquet et al. 2019). Bundles carry their own grid; this is the default
#: used when a network is built.
DEFAULT_Z_MIN: float = 0.0
DEFAULT_Z_MAX: float = 0.4
DEFAULT_N_BINS: int = 180

#: The galactic reddening E(B-V) a cutout may carry, mag: 0 up to 10, beyond the densest lines of sight
#: (Schlegel et al. 1998's map saturates in the Galactic plane at a few mag; extragalactic fields have < 0.5).
EBV_RANGE_MAG: tuple[float, float] = (0.0, 10.0)

#: Outlier threshold on |dz| = |z_phot - z_spec| / (1 + z_spec)
#: (Pasquet et al. 2019).
OUTLIER_DZ_THRESHOLD: float = 0.05


def mag_to_nanomaggies(mag: Any) -> Any:
    """AB magnitude to flux in nanomaggies."""
    return 10.0 ** ((NANOMAGGY_ZEROPOINT_MAG - mag) / 2.5)


def nanomaggies_to_mag(flux_nmgy: Any) -> Any:
    """Flux in nanomaggies (> 0) to AB magnitude."""
    import numpy as np

    return NANOMAGGY_ZEROPOINT_MAG - 2.5 * np.log10(flux_nmgy)


def sky_sigma_nmgy_per_pixel(band: str) -> float:
    """Per-pixel sky noise (1 sigma, nanomaggies) that gives the band's depth.

    A point source seen through the median-seeing Moffat PSF and measured
    with the optimal (PSF-weighted) estimator has a noise-equivalent area
    NEA = pi alpha^2 (2 beta - 1) / (beta - 1)^2; its 5-sigma flux is the
    band's depth, so sigma_pixel = f_5sigma / 5 / sqrt(NEA).
    """
    fwhm_pixels = MEDIAN_SEEING_FWHM_ARCSEC[band] / PIXEL_SCALE_ARCSEC
    beta = PSF_MOFFAT_BETA
    alpha = fwhm_pixels / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    noise_equivalent_area = math.pi * alpha**2 * (2 * beta - 1) / (beta - 1) ** 2
    flux_5sigma = float(mag_to_nanomaggies(DEPTH_5SIGMA_MAG[band]))
    return flux_5sigma / 5.0 / math.sqrt(noise_equivalent_area)


#: Typical SDSS dark-sky surface brightness, AB mag per arcsec^2
#: (Stoughton et al. 2002). With the depths above it fixes the effective
#: gain (electrons per nanomaggy) and hence the Poisson noise of sources.
SKY_BRIGHTNESS_MAG_ARCSEC2: dict[str, float] = {
    "u": 22.1, "g": 21.7, "r": 20.9, "i": 20.2, "z": 18.9,
}

#: SDSS asinh-magnitude softening b per band, in maggies (Lupton et al. 1999;
#: SDSS photometric flux calibration docs).
ASINH_SOFTENING_MAGGIES: dict[str, float] = {
    "u": 1.4e-10, "g": 0.9e-10, "r": 1.2e-10, "i": 1.8e-10, "z": 7.4e-10,
}


def sky_level_nmgy_per_pixel(band: str) -> float:
    """Mean sky flux in one pixel, nanomaggies."""
    return float(mag_to_nanomaggies(SKY_BRIGHTNESS_MAG_ARCSEC2[band])) * PIXEL_SCALE_ARCSEC**2


def effective_gain_e_per_nmgy(band: str) -> float:
    """Electrons per nanomaggy such that the sky's Poisson noise is the depth's sky noise."""
    return sky_level_nmgy_per_pixel(band) / sky_sigma_nmgy_per_pixel(band) ** 2


def asinh_mag(flux_nmgy: Any, band: str) -> Any:
    """SDSS asinh magnitude ("luptitude") of a flux in nanomaggies; defined for flux <= 0."""
    import numpy as np

    b = ASINH_SOFTENING_MAGGIES[band]
    return -2.5 / np.log(10) * (np.arcsinh(np.asarray(flux_nmgy) * 1e-9 / (2 * b)) + np.log(b))


def dereddened(mags: Any, extinction: Any = None, ebv: Any = None) -> Any:
    """(N, 5) magnitudes in BANDS order corrected for Galactic extinction (float64, mag): ``extinction`` per band
    (N, 5) in mag as a catalogue gives it (SDSS's ``extinction_*``), else ``ebv`` (N,) times
    :data:`EXTINCTION_A_OVER_EBV`."""
    import numpy as np

    mags = np.asarray(mags, dtype=np.float64)
    if extinction is None:
        if ebv is None:
            raise ValueError("dereddening needs the extinction per band or E(B-V)")
        coefficients = np.array([EXTINCTION_A_OVER_EBV[b] for b in BANDS])
        extinction = np.asarray(ebv, dtype=np.float64)[:, None] * coefficients[None, :]
    return mags - np.asarray(extinction, dtype=np.float64)
