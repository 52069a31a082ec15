"""The simulated instrument: seeing, noise and depth calibrated on SDSS (`InstrumentConfig`), and the artefacts
a real frame carries (saturation and bleed trails, cosmic rays, bad columns, field stars), with the truth flags
that record them."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from photoz.model.conventions import (
    BANDS,
    CUTOUT_SIZE_PIXELS,
    PIXEL_SCALE_ARCSEC,
    effective_gain_e_per_nmgy,
    sky_sigma_nmgy_per_pixel,
)


@dataclass(frozen=True)


class InstrumentConfig:
    seeing_sigma_ln: float = 0.15  # scatter of the r-band FWHM around the SDSS median
    band_seeing_sigma_ln: float = 0.03  # extra per-band scatter
    # PSF: a Moffat core (conventions.PSF_MOFFAT_BETA) plus a Gaussian wing of this share of the light and
    # this times the core's FWHM, sheared by an ellipticity drawn per object (SDSS PSFs are a few % elliptical)
    psf_wing_fraction: float = 0.1
    psf_wing_fwhm_ratio: float = 2.5
    psf_shear_sigma: float = 0.03
    centring_sigma_pixels: float = 0.5
    neighbours_per_cutout: float = 0.3  # Poisson mean: ~6000 objects/deg^2 to r = 22
    neighbour_star_fraction: float = 0.35
    neighbour_r_limit_mag: float = 22.0
    neighbour_min_distance_arcsec: float = 1.0  # uniform in area beyond this (SDSS deblends pairs to ~1")
    # noise calibration against the real SDSS magnitude errors (docs/simulation.md): per band ugriz, the
    # depth's offset from conventions.DEPTH_5SIGMA_MAG (mag; positive is shallower: more sky noise) and the
    # factor on the effective gain (less Poisson noise of the sources when > 1)
    # (fitted on simulator 1.5.0: they put the 5-sigma point-source depths at u 22.16, g 23.37, r 23.1, i 22.61,
    # z 20.58; the MGS's r errors, dominated by the galaxies' own Poisson noise, hardly constrain the r sky)
    depth_offset_mag: tuple[float, ...] = (0.16, -0.83, -0.9, -1.31, -0.08)
    gain_scale: tuple[float, ...] = (0.31, 1.15, 0.46, 1.01, 0.33)
    sky_brightness_sigma_mag: float = 0.25  # per object and band; real r-band sky quartiles 20.70-21.03
    # sky-subtraction error: a constant per object and band, this fraction of the sky level (1 sigma)
    sky_offset_fraction: float = 0.002
    # cosmic rays per band and cutout (Poisson mean): short tracks the photometric pipeline finds and
    # interpolates over before cutouts are made; the object's flags record it
    cosmic_rays_per_band: float = 0.1
    # bad CCD columns per band and cutout (Poisson mean; SDSS's masks hold a handful per 2048-column chip, so
    # a 64-pixel cutout crosses one in a few per cent of its bands): interpolated over and flagged
    bad_columns_per_band: float = 0.03
    close_neighbour_arcsec: float = 3.0  # a neighbour nearer than this sets the close-neighbour flag
    # a pixel saturates above this (nanomaggies; ~55,000 counts at the r band's ~0.005 nanomaggies per count:
    # the peak of a star of r ~ 13.7 in median seeing)
    saturation_nmgy_per_pixel: float = 250.0
    # u, g, i, z are drawn on their own pixel grids, shifted by up to half a pixel, and resampled onto the
    # r grid with the bicubic spline ``photoz cutouts`` uses (which smooths and correlates their noise)
    resample_bands: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):  # hashable, JSON-stable
        object.__setattr__(self, "depth_offset_mag", tuple(float(x) for x in self.depth_offset_mag))
        object.__setattr__(self, "gain_scale", tuple(float(x) for x in self.gain_scale))

    def sky_sigma_nmgy(self) -> np.ndarray:
        """Per-pixel sky noise (nanomaggies) of each band at the calibrated depth and median sky."""
        return band_values(sky_sigma_nmgy_per_pixel) * 10 ** (0.4 * np.array(self.depth_offset_mag))

    def gain_e_per_nmgy(self) -> np.ndarray:
        return band_values(effective_gain_e_per_nmgy) * np.array(self.gain_scale)


def band_values(per_band) -> np.ndarray:
    """A conventions function of the band, for every band in BANDS order: (5,)."""
    return np.array([per_band(b) for b in BANDS])


#: Per-object artefact flags (``truth/flags``): bit b (0..4) a cosmic ray was interpolated over in band b
FLAG_COSMIC_RAY_BAND_BIT = {band: 1 << b for b, band in enumerate(BANDS)}
FLAG_CLOSE_NEIGHBOUR = 1 << 5  # a neighbour (star or galaxy) within close_neighbour_arcsec of the centre
FLAG_SATURATED = 1 << 6  # saturated pixels (and their bleed trail) in some band of the cutout
FLAG_BAD_COLUMN = 1 << 7  # a bad column was interpolated over in some band of the cutout


def saturate(bands: np.ndarray, level: float) -> np.ndarray:
    """Clip noise-free images (B, S, S, nanomaggies) at the saturation ``level`` per pixel and bleed the excess
    charge along the columns (the CCD's readout direction, y) on both sides of the saturated run, as SDSS
    frames show around bright stars. Modifies ``bands``; returns which bands saturated."""
    hit = np.zeros(bands.shape[0], bool)
    for b in np.flatnonzero(bands.max(axis=(1, 2)) > level):
        image = bands[b]
        over = image > level
        for x in np.flatnonzero(over.any(axis=0)):
            rows = np.flatnonzero(over[:, x])
            bleed = int(np.ceil((image[rows, x] - level).sum() / level / 2))
            lo, hi = max(rows.min() - bleed, 0), min(rows.max() + bleed, image.shape[0] - 1)
            image[lo:hi + 1, x] = np.maximum(np.minimum(image[lo:hi + 1, x], level), level * (1 - 1e-6))
        hit[b] = True
    return hit


def add_cosmic_rays(images: np.ndarray, sky_sigma: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Hit noisy cutouts (N, B, S, S) with cosmic-ray tracks (Poisson ``rate`` per band and cutout; 1-4 pixels
    of 20-200 sky sigma) and, as a photometric pipeline does, replace the hit pixels by the mean of their
    unhit neighbours. Returns the (N, B) mask of band-cutouts that were hit and repaired."""
    n, n_bands, size, _ = images.shape
    hits = rng.poisson(rate, (n, n_bands))
    for k, b in zip(*np.nonzero(hits), strict=True):
        mask = np.zeros((size, size), bool)
        for _ in range(hits[k, b]):
            x, y = rng.integers(0, size, 2)
            dx, dy = rng.choice([-1, 0, 1], 2)
            for step in range(int(rng.integers(1, 5))):
                xx, yy = x + step * dx, y + step * dy
                if 0 <= xx < size and 0 <= yy < size:
                    mask[yy, xx] = True
        image = images[k, b]
        image[mask] += rng.uniform(20, 200, int(mask.sum())) * sky_sigma[k, b]
        good = ~mask
        padded, weight = np.pad(np.where(good, image, 0.0), 1), np.pad(good.astype(np.float64), 1)
        total = functools.reduce(np.add, (padded[1 + oy:1 + oy + size, 1 + ox:1 + ox + size]
                                          for oy in (-1, 0, 1) for ox in (-1, 0, 1)))
        count = functools.reduce(np.add, (weight[1 + oy:1 + oy + size, 1 + ox:1 + ox + size]
                                          for oy in (-1, 0, 1) for ox in (-1, 0, 1)))
        image[mask] = np.where(count[mask] > 0, total[mask] / np.maximum(count[mask], 1), 0.0)
    return hits > 0


def add_bad_columns(images: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Give noisy cutouts (N, B, S, S) bad CCD columns (Poisson ``rate`` per band and cutout; 1 or 2 pixels
    wide, along y, the readout direction; three in ten start at a row, below a charge trap, the rest cross the
    cutout) and replace them, as SDSS's photometric pipeline does, by linear interpolation between the good
    columns on either side (the one side at the cutout's edge): smooth pixels with less noise than the sky's.
    Returns the (N, B) mask of band-cutouts that carry one."""
    n, n_bands, size, _ = images.shape
    hits = rng.poisson(rate, (n, n_bands))
    for k, b in zip(*np.nonzero(hits), strict=True):
        image = images[k, b]
        for _ in range(hits[k, b]):
            width = int(rng.integers(1, 3))
            x0 = int(rng.integers(0, size - width + 1))
            y0 = int(rng.integers(0, size)) if rng.uniform() < 0.3 else 0
            left, right = x0 - 1, x0 + width
            left_values = image[y0:, left] if left >= 0 else image[y0:, right]
            right_values = image[y0:, right] if right < size else left_values
            for j in range(width):
                w = np.float32((j + 1) / (width + 1))
                image[y0:, x0 + j] = (1 - w) * left_values + w * right_values
    return hits > 0


def neighbour_radius_arcsec(rng: np.random.Generator, inst: InstrumentConfig, size=None):
    """Distance of a neighbour from the target: uniform in area from the deblending limit to 1.3 times the
    cutout's half-width (unclustered: the projected density of unrelated objects is flat)."""
    r_max = CUTOUT_SIZE_PIXELS * PIXEL_SCALE_ARCSEC / 2 * 1.3
    return np.sqrt(rng.uniform(inst.neighbour_min_distance_arcsec**2, r_max**2, size))


def star_magnitudes(rng: np.random.Generator, n: int) -> np.ndarray:
    """ugriz of field stars along a simple stellar locus, r between 12 and 22 (2% brighter than 14, where
    SDSS saturates)."""
    s = rng.uniform(0, 1, n)  # 0 = F/G, 1 = M
    r = 22.0 - rng.exponential(2.0, n).clip(0, 10)
    g = r + 0.25 + 1.2 * s
    u = g + 0.9 + 1.4 * s - 0.6 * s**2
    i = r - 0.05 - 1.0 * s**2
    z = i - 0.02 - 0.5 * s**2
    return np.stack([u, g, r, i, z], axis=1)


def noise_sigma(clean: np.ndarray, sky=None, gain=None) -> np.ndarray:
    """Per-pixel noise (nanomaggies): sky + read noise (``sky``, broadcast against ``clean``; default the
    conventions' depths), plus source Poisson noise with ``gain`` electrons per nanomaggy."""
    sky = band_values(sky_sigma_nmgy_per_pixel)[None, :, None, None] if sky is None else sky
    gain = band_values(effective_gain_e_per_nmgy)[None, :, None, None] if gain is None else gain
    # sqrt(sky^2 + max(clean, 0) / gain) in float64, computed in place (same numbers, no temporaries)
    sigma = np.empty(clean.shape, np.float64)
    np.divide(np.maximum(clean, 0), gain, out=sigma)
    np.add(np.square(sky), sigma, out=sigma)
    return np.sqrt(sigma, out=sigma)


def add_noise(clean: np.ndarray, rng: np.random.Generator, sky=None, gain=None) -> np.ndarray:
    noise = rng.standard_normal(size=clean.shape, dtype=np.float32)
    np.multiply(noise, noise_sigma(clean, sky, gain), out=noise, casting="unsafe")
    np.add(clean, noise, out=noise)
    return noise
