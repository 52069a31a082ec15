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
    sky_level_nmgy_per_pixel,
    sky_sigma_nmgy_per_pixel,
)
from photoz.training.baseline import dereddened
from photoz.training.sim.population import NEIGHBOUR_Z_MAX, PopulationConfig, draw_candidates, fill

PETROSIAN_ETA = 0.2
#: Looser than GalSim's defaults (folding 5e-3): flux lost to aliasing stays
#: below 1%, far under the sky noise of a cutout, and drawing is ~2x faster.
GSPARAMS = {"folding_threshold": 1e-2, "maxk_threshold": 3e-3}


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
        return _band_values(sky_sigma_nmgy_per_pixel) * 10 ** (0.4 * np.array(self.depth_offset_mag))

    def gain_e_per_nmgy(self) -> np.ndarray:
        return _band_values(effective_gain_e_per_nmgy) * np.array(self.gain_scale)


def _band_values(per_band) -> np.ndarray:
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
        total = sum(padded[1 + oy:1 + oy + size, 1 + ox:1 + ox + size] for oy in (-1, 0, 1) for ox in (-1, 0, 1))
        count = sum(weight[1 + oy:1 + oy + size, 1 + ox:1 + ox + size] for oy in (-1, 0, 1) for ox in (-1, 0, 1))
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


@functools.lru_cache(maxsize=1)
def _gsparams():
    """One GSParams for every profile (shared, so GalSim never copies profiles to apply it)."""
    import warnings

    import galsim

    # GalSim notes when a truncated profile falls back from real-space to DFT
    # convolution; that is the method we want, so the note is noise (set once per process)
    warnings.filterwarnings("ignore", message=".*real space convolution.*", category=galsim.GalSimWarning)
    return galsim.GSParams(**GSPARAMS)


@dataclass(frozen=True)
class PSFShape:
    """What the PSF has besides its Moffat core's FWHM: a Gaussian wing (share of the light, FWHM over the
    core's) and a shear (g1, g2). The default is the plain Moffat core."""

    wing_fraction: float = 0.0
    wing_fwhm_ratio: float = 2.5
    g1: float = 0.0
    g2: float = 0.0


def psf_profile(fwhm: float, shape: PSFShape | None = None):
    """The PSF (unit flux) with FWHM ``fwhm`` of its core, in whatever length unit ``fwhm`` is in."""
    import galsim

    gsparams = _gsparams()
    psf = galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=fwhm, gsparams=gsparams)
    if shape is None:
        return psf
    if shape.wing_fraction > 0:
        wing = galsim.Gaussian(fwhm=fwhm * shape.wing_fwhm_ratio, gsparams=gsparams)
        psf = galsim.Add([psf * (1 - shape.wing_fraction), wing * shape.wing_fraction], gsparams=gsparams)
    if shape.g1 or shape.g2:
        psf = psf.shear(g1=shape.g1, g2=shape.g2)
    return psf


def psf_k_images(kx: np.ndarray, ky: np.ndarray, fwhms, shape: PSFShape | None = None) -> np.ndarray:
    """Fourier transforms of :func:`psf_profile` (unit flux at k = 0) for each core FWHM in ``fwhms`` (one
    shape), on the grid ``ky`` x ``kx`` (radians per the unit the FWHMs are in): (len(fwhms), len(ky),
    len(kx)) float32, as GalSim's k-images of the same profiles (to its 1e-6 table accuracy; a test checks) at a
    fraction of the cost: the sheared |k| is computed once for every band.

    The untruncated Moffat's transform is (k r_d)^nu K_nu(k r_d) / (2^(nu-1) Gamma(nu)), nu = beta - 1, r_d its
    scale radius; for beta = 3.5 that is exp(-x) (1 + x + x^2 / 3), x = k r_d. The wing is a Gaussian; the
    shear (g1, g2) maps k through the shear's (symmetric) matrix."""
    shape = shape or PSFShape()
    kx, ky = np.asarray(kx, np.float64)[None, :], np.asarray(ky, np.float64)[:, None]
    g_squared = shape.g1**2 + shape.g2**2
    if g_squared:
        f = 1 / np.sqrt(1 - g_squared)
        kx, ky = f * ((1 + shape.g1) * kx + shape.g2 * ky), f * (shape.g2 * kx + (1 - shape.g1) * ky)
    k = np.broadcast_to(np.sqrt(kx * kx + ky * ky), (ky.shape[0], kx.shape[1])).astype(np.float32)
    fwhms = np.asarray(fwhms, np.float64).reshape(-1, 1, 1)
    x = k[None] * (fwhms / (2 * np.sqrt(2 ** (1 / PSF_MOFFAT_BETA) - 1))).astype(np.float32)
    if PSF_MOFFAT_BETA == 3.5:
        transform = np.exp(-x) * (1 + x + x * x / np.float32(3))
    else:
        from scipy.special import gamma, kv

        nu = PSF_MOFFAT_BETA - 1
        with np.errstate(invalid="ignore"):
            transform = np.where(x > 0, x**nu * kv(nu, x) / (2 ** (nu - 1) * gamma(nu)), 1.0).astype(np.float32)
    if shape.wing_fraction > 0:
        s = (fwhms * shape.wing_fwhm_ratio / (2 * np.sqrt(2 * np.log(2)))).astype(np.float32)
        ks = k[None] * s
        transform = np.float32(1 - shape.wing_fraction) * transform + \
            np.float32(shape.wing_fraction) * np.exp(np.float32(-0.5) * ks * ks)
    return transform


def draw(profiles: list, psf_fwhm_arcsec: float, psf_shape: PSFShape | None = None) -> np.ndarray:
    """Sum of GalSim profiles (flux in nanomaggies, positions in arcsec from the centre)
    seen through the PSF, drawn (with the pixel response) on the cutout grid.

    One band with GalSim's own ``drawImage``: the reference ``draw_bands`` is tested against,
    and the way to draw a single stamp (stars for PSF checks)."""
    import galsim

    gsparams = _gsparams()
    psf = psf_profile(psf_fwhm_arcsec, psf_shape)
    image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=PIXEL_SCALE_ARCSEC)
    galsim.Convolve(galsim.Add(profiles), psf, gsparams=gsparams).drawImage(image=image, method="auto")
    return image.array


def draw_bands(components: list, fluxes_nmgy: np.ndarray, psf_fwhm_arcsec, psf_shape: PSFShape | None = None,
               band_shifts_pixels: np.ndarray | None = None, first_components: int | None = None):
    """Cutouts (n_bands, S, S): unit-flux GalSim components (positions in arcsec from the centre) with
    per-band fluxes ``fluxes_nmgy`` (n_bands, n_components), each band seen through its own PSF (core FWHM
    ``psf_fwhm_arcsec[b]``, the same ``psf_shape``) and, with ``band_shifts_pixels`` (n_bands, 2: x, y),
    the whole scene moved by that many pixels in each band. With ``first_components`` it also returns the
    image of the first that many components alone (a galaxy without its neighbours), from the same k-images.

    The same pixels as ``draw(profiles_of_band_b, fwhm_b)`` for every band (GalSim FFT drawing with the
    pixel response, up to GalSim's folding and k-range accuracy), at a fraction of the cost: each
    component's Fourier image is drawn once per object instead of once per band, on the k-grid that the
    most demanding band needs (the widest PSF sets the real-space size, the narrowest the k range), and
    only the PSF changes between bands (its k-image from :func:`psf_k_images`; a band's shift is a phase
    factor on the same k-image). This is
    GalSim's own split of ``drawFFT`` into ``drawFFT_makeKImage``, the profiles' k-images and
    ``drawFFT_finish``, which its documentation suggests for reusing k-images.
    """
    import galsim

    gsparams = _gsparams()
    inverse_scale = 1.0 / PIXEL_SCALE_ARCSEC
    # image coordinates (pixels); origin on the cutout's true centre, half a pixel off the integer centre
    shapes = [c.dilate(inverse_scale).shift(-0.5, -0.5) for c in components]
    widths = np.asarray(psf_fwhm_arcsec, dtype=float) * inverse_scale  # pixels
    pixel = galsim.Pixel(1.0, gsparams=gsparams)
    image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=1.0)
    image.setCenter(0, 0)
    total = galsim.Add(shapes, gsparams=gsparams)
    grids = [galsim.Convolve(total, psf_profile(float(widths[b]), psf_shape), pixel,
                             gsparams=gsparams).drawFFT_makeKImage(image)
             for b in sorted({int(widths.argmax()), int(widths.argmin())})]
    kimage = max((g[0] for g in grids), key=lambda k: k.array.size)
    wrap = max(g[1] for g in grids)

    def k_array(profile) -> np.ndarray:
        profile._drawKImage(kimage)
        return kimage.array.copy()

    component_k = np.stack([k_array(s) for s in shapes])  # (n_components, ky, kx)
    pixel_k = k_array(pixel)
    bounds = kimage.bounds
    kx = np.arange(bounds.xmin, bounds.xmax + 1) * kimage.scale
    ky = np.arange(bounds.ymin, bounds.ymax + 1) * kimage.scale
    out = np.empty((len(widths), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS), np.float32)
    first = out.copy() if first_components is not None else None
    fluxes = np.asarray(fluxes_nmgy, dtype=np.float32)
    psf_ks = psf_k_images(kx, ky, widths, psf_shape)  # every band's PSF at once, in numpy
    for band in range(len(widths)):
        psf_k = psf_ks[band] * pixel_k
        if band_shifts_pixels is not None and np.any(band_shifts_pixels[band]):
            dx, dy = band_shifts_pixels[band]
            psf_k *= np.exp(-1j * ky * dy)[:, None] * np.exp(-1j * kx * dx)[None, :]
        scene = fluxes[band, 0] * component_k[0]  # a few multiply-adds: no BLAS call (its threads fight workers)
        for c in range(1, len(shapes)):
            if c == first_components and first is not None:
                kimage.array[...] = scene * psf_k
                total.drawFFT_finish(image, kimage, wrap, add_to_image=False)
                first[band] = image.array
            scene += fluxes[band, c] * component_k[c]
        kimage.array[...] = scene * psf_k
        total.drawFFT_finish(image, kimage, wrap, add_to_image=False)
        out[band] = image.array
        if first is not None and first_components >= len(shapes):
            first[band] = out[band]
    return out if first is None else (out, first)


def resample_onto_reference(images: np.ndarray, shifts_pixels: np.ndarray) -> np.ndarray:
    """Images (M, S, S) whose scenes sit ``shifts_pixels`` (M, 2: x, y; each within a pixel) off the reference
    grid, resampled onto that grid with the bicubic spline ``photoz cutouts`` resamples with (reproject's
    ``order="bicubic"``: a cubic B-spline with its prefilter, scipy.ndimage order 3).

    The same numbers as ``scipy.ndimage.shift(image, (-y, -x), order=3)`` away from the edges (a test checks
    it), for a whole stack at once: the prefilter runs over the stack along each axis, and the shift is the
    B-spline's four taps per axis, weighted per image."""
    from scipy import ndimage

    coeffs = np.asarray(images, dtype=np.float32)
    for axis in (-1, -2):
        coeffs = ndimage.spline_filter1d(coeffs, 3, axis=axis, mode="mirror", output=np.float32)
    for axis, shift in ((-1, shifts_pixels[:, 0]), (-2, shifts_pixels[:, 1])):
        coeffs = _bspline_taps(coeffs, np.asarray(shift, dtype=np.float64), axis)
    return coeffs.astype(np.float32)


def _bspline_taps(coeffs: np.ndarray, shift: np.ndarray, axis: int) -> np.ndarray:
    """Cubic B-spline with coefficients ``coeffs`` evaluated at x + shift along ``axis`` (|shift| <= 1)."""
    base = np.floor(shift)
    t = shift - base
    taps = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], axis=1) / 6
    pad = [(0, 0)] * coeffs.ndim
    pad[axis] = (3, 3)
    padded = np.pad(coeffs, pad, mode="edge")
    size = coeffs.shape[axis]
    out = np.zeros_like(coeffs)
    shape = (-1,) + (1,) * (coeffs.ndim - 1)
    for offset in range(-2, 4):  # x + base + j for base in {-2 .. 1} and taps j = -1 .. 2
        weight = np.zeros(coeffs.shape[0])
        for j in range(4):
            hit = base + j - 1 == offset
            weight[hit] = taps[hit, j]
        if np.any(weight):
            window = [slice(None)] * coeffs.ndim
            window[axis] = slice(3 + offset, 3 + offset + size)
            out += weight.astype(coeffs.dtype).reshape(shape) * padded[tuple(window)]
    return out


def _galaxy_components(galsim, row: dict, dx_arcsec: float, dy_arcsec: float) -> tuple[list, np.ndarray]:
    """Unit-flux bulge and disk profiles of a galaxy and their fluxes (n_bands, n_components) in nanomaggies.
    A component with under 1% of the light is not drawn; the other carries the galaxy's whole flux."""
    r50 = max(float(row["r50_arcsec"]), 0.05)
    beta = float(row["position_angle_deg"]) * galsim.degrees
    parts, fluxes = [], []
    bulge, disk = mag_to_nanomaggies(np.asarray(row["mag_bulge"])), mag_to_nanomaggies(np.asarray(row["mag_disk"]))
    with_bulge, with_disk = row["bulge_fraction"] > 0.01, row["bulge_fraction"] < 0.99
    if with_bulge:
        bulge_hlr = r50 * (1.0 if row["bulge_fraction"] > 0.8 else 0.6)
        parts.append(galsim.DeVaucouleurs(half_light_radius=bulge_hlr, trunc=8 * bulge_hlr, gsparams=_gsparams())
                     .shear(q=float(row["bulge_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(bulge if with_disk else bulge + disk)
    if with_disk:
        parts.append(galsim.Exponential(half_light_radius=r50, gsparams=_gsparams())
                     .shear(q=float(row["disk_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(disk if with_bulge else bulge + disk)
    return parts, np.stack(fluxes, axis=1)


def _galaxy_profile(galsim, row: dict, band_index: int, dx_arcsec: float, dy_arcsec: float):
    """The galaxy in one band: bulge + disk with that band's fluxes (nanomaggies)."""
    parts, fluxes = _galaxy_components(galsim, row, dx_arcsec, dy_arcsec)
    return galsim.Add([p * float(f) for p, f in zip(parts, fluxes[band_index], strict=True)])


def render_galaxies(pop: dict, rng: np.random.Generator, inst: InstrumentConfig,
                    neighbour_pool: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Noise-free cutouts (N, 5, 64, 64) in nanomaggies, each band on its own pixel grid; the noisy cutouts
    resampled onto the r band's grid; per-object draws (PSF, offsets, shifts, neighbours, sky noise); and the
    photometry's inputs, on each band's own grid: the noisy cutouts with the neighbours' light taken out
    (``deblended``: what an ideal deblender gives; SDSS deblends pairs down to ~1") and ``model_templates``
    (each galaxy's own noise-free profile in each band, scaled to a total flux of one: the fit of a perfect
    model magnitude)."""
    import galsim

    n = pop["z"].size
    size, scale = CUTOUT_SIZE_PIXELS, PIXEL_SCALE_ARCSEC
    fwhm_r = MEDIAN_SEEING_FWHM_ARCSEC["r"] * np.exp(rng.normal(0, inst.seeing_sigma_ln, n))
    fwhm = np.stack([fwhm_r * MEDIAN_SEEING_FWHM_ARCSEC[b] / MEDIAN_SEEING_FWHM_ARCSEC["r"]
                     * np.exp(rng.normal(0, inst.band_seeing_sigma_ln, n)) for b in BANDS], axis=1)
    psf_shear = rng.normal(0, inst.psf_shear_sigma, (n, 2))
    offsets = np.clip(rng.normal(0, inst.centring_sigma_pixels, (n, 2)), -1.5, 1.5) * scale
    band_shifts = rng.uniform(-0.5, 0.5, (n, len(BANDS), 2))
    band_shifts[:, BANDS.index("r")] = 0.0  # the reference grid
    if not inst.resample_bands:
        band_shifts[:] = 0.0
    # sky brighter or darker than the median: its noise scales as the square root of its level
    sky_sigma = inst.sky_sigma_nmgy()[None, :] * 10 ** (-0.2 * rng.normal(0, inst.sky_brightness_sigma_mag,
                                                                            (n, len(BANDS))))
    n_neigh = rng.poisson(inst.neighbours_per_cutout, n)
    nearest = np.full(n, np.inf)
    saturated = np.zeros(n, bool)
    clean = np.zeros((n, len(BANDS), size, size), np.float32)
    own = np.zeros_like(clean)  # each galaxy without its neighbours
    own_flux = np.zeros((n, len(BANDS)))
    noise_seeds = rng.integers(0, 2**31 - 1, n)
    pool_next = 0
    for k in range(n):
        row = {key: value[k] for key, value in pop.items()}
        neighbours = []
        for _ in range(n_neigh[k]):
            # uniform in area between the deblending limit and beyond the cutout's edge
            radius = float(neighbour_radius_arcsec(rng, inst))
            nearest[k] = min(nearest[k], radius)
            angle = rng.uniform(0, 2 * np.pi)
            position = (radius * np.cos(angle), radius * np.sin(angle))
            if rng.uniform() < inst.neighbour_star_fraction:
                neighbours.append(("star", star_magnitudes(rng, 1)[0], position))
            else:
                neighbours.append(("galaxy", {key: v[pool_next % len(v)] for key, v in neighbour_pool.items()},
                                   position))
                pool_next += 1
        components, fluxes = _galaxy_components(galsim, row, *offsets[k])
        n_own = len(components)
        for kind, what, (x, y) in neighbours:
            if kind == "star":
                parts, part_fluxes = [galsim.DeltaFunction(gsparams=_gsparams()).shift(x, y)], \
                    mag_to_nanomaggies(np.asarray(what))[:, None]
            else:
                parts, part_fluxes = _galaxy_components(galsim, what, x, y)
            components += parts
            fluxes = np.concatenate([fluxes, part_fluxes], axis=1)
        shape = PSFShape(inst.psf_wing_fraction, inst.psf_wing_fwhm_ratio, *psf_shear[k])
        if len(components) > n_own:
            clean[k], own[k] = draw_bands(components, fluxes, fwhm[k], shape, band_shifts[k], first_components=n_own)
            saturate(own[k], inst.saturation_nmgy_per_pixel)
        else:
            clean[k] = own[k] = draw_bands(components, fluxes, fwhm[k], shape, band_shifts[k])
        saturated[k] = saturate(clean[k], inst.saturation_nmgy_per_pixel).any()
        own_flux[k] = fluxes[:, :n_own].sum(axis=1)
    noisy = add_noise(clean, np.random.default_rng(noise_seeds), sky_sigma[:, :, None, None],
                      inst.gain_e_per_nmgy()[None, :, None, None])
    sky_level = _band_values(sky_level_nmgy_per_pixel)
    sky_offset = rng.normal(0, inst.sky_offset_fraction, (n, len(BANDS))) * sky_level[None, :]
    noisy += sky_offset[:, :, None, None].astype(np.float32)
    cosmic = add_cosmic_rays(noisy, sky_sigma, inst.cosmic_rays_per_band, rng)
    bad_columns = add_bad_columns(noisy, inst.bad_columns_per_band, rng)
    flags = (cosmic * np.array([FLAG_COSMIC_RAY_BAND_BIT[b] for b in BANDS])[None, :]).sum(axis=1)
    flags |= np.where(bad_columns.any(axis=1), FLAG_BAD_COLUMN, 0)
    flags |= np.where(nearest < inst.close_neighbour_arcsec, FLAG_CLOSE_NEIGHBOUR, 0)
    flags |= np.where(saturated, FLAG_SATURATED, 0)
    # the photometry is measured on each band's own pixel grid, as a pipeline measures each frame, with the
    # neighbours deblended; the cutouts then go onto the r grid
    crowded = np.flatnonzero(n_neigh > 0)
    measured = noisy.copy()
    measured[crowded] -= clean[crowded] - own[crowded]
    templates = own / np.maximum(own_flux, 1e-30)[:, :, None, None].astype(np.float32)
    moved = [b for b in range(len(BANDS)) if np.any(band_shifts[:, b])]
    if moved:  # onto the r grid, as ``photoz cutouts`` does with real frames (``clean`` stays on each band's own)
        part = noisy[:, moved]
        noisy[:, moved] = resample_onto_reference(part.reshape(-1, size, size),
                                                  band_shifts[:, moved].reshape(-1, 2)).reshape(part.shape)
    draws = {"psf_fwhm_arcsec": fwhm.astype(np.float32), "psf_shear": psf_shear.astype(np.float32),
             "offset_arcsec": offsets.astype(np.float32), "band_shift_pixels": band_shifts.astype(np.float32),
             "sky_sigma_nmgy": sky_sigma.astype(np.float32), "sky_offset_nmgy": sky_offset.astype(np.float32),
             "n_neighbours": n_neigh.astype(np.int16), "nearest_neighbour_arcsec": nearest.astype(np.float32),
             "flags": flags.astype(np.int16)}
    return clean, noisy, draws, {"deblended": measured, "model_templates": templates}


def noise_sigma(clean: np.ndarray, sky=None, gain=None) -> np.ndarray:
    """Per-pixel noise (nanomaggies): sky + read noise (``sky``, broadcast against ``clean``; default the
    conventions' depths), plus source Poisson noise with ``gain`` electrons per nanomaggy."""
    sky = _band_values(sky_sigma_nmgy_per_pixel)[None, :, None, None] if sky is None else sky
    gain = _band_values(effective_gain_e_per_nmgy)[None, :, None, None] if gain is None else gain
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


def _radial_profile(images: np.ndarray, radii: np.ndarray):
    """Cumulative flux and pixel area within each radius (about the cutout centre)."""
    size = images.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    rpix = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2).ravel()
    inside = rpix[None, :] <= radii[:, None]  # (R, P)
    flux = images.reshape(images.shape[0], -1) @ inside.T.astype(np.float64)  # (N, R)
    return flux, inside.sum(axis=1).astype(np.float64)


def measure_catalogue(noisy: np.ndarray, sky_sigma: np.ndarray, gain: np.ndarray,
                      model_templates: np.ndarray) -> dict[str, np.ndarray]:
    """SDSS-style photometry of noisy cutouts (N, 5, S, S) in nanomaggies, whose per-pixel sky noise is
    ``sky_sigma`` (N, 5) and gain ``gain`` (5,) electrons per nanomaggy: the errors a pipeline would quote
    from its own noise model. Petrosian fluxes in every band within two r-band Petrosian radii; model fluxes
    fitted with ``model_templates`` (N, 5, S, S: each galaxy's noise-free profile in each band through that
    band's PSF, scaled to unit total flux), as SDSS fits a profile convolved with each band's PSF (a perfect
    fit: the profile is the true one, so colour gradients do not shift model colours)."""
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
    for b in range(len(BANDS)):
        flux_b, _ = _radial_profile(noisy[:, b], radii)
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


def simulate_chunk(pop_cfg: PopulationConfig, inst: InstrumentConfig, seed: int, chunk: int,
                   n: int) -> dict[str, np.ndarray]:
    """All outputs for one chunk of n galaxies; a pure function of (configs, seed, chunk).

    Candidates (noise-free r within ``candidate_margin_mag`` of the limit) are rendered and measured, and
    those whose measured, dereddened Petrosian r passes the MGS limit are kept, round after round, until
    the chunk is full: the selection SDSS made, with its scatter and its dependence on profile."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, chunk]))
    pool = draw_candidates(pop_cfg, 4 * n + 16, rng, r_limit=inst.neighbour_r_limit_mag, z_max=NEIGHBOUR_Z_MAX)
    r = BANDS.index("r")

    def batch(missing: int):
        pop = draw_candidates(pop_cfg, int(1.1 * missing) + 4, rng)
        _, noisy, draws, measured = render_galaxies(pop, rng, inst, pool)
        catalogue = measure_catalogue(measured["deblended"], draws["sky_sigma_nmgy"], inst.gain_e_per_nmgy(),
                                      measured["model_templates"])
        out = {"images": noisy, "z": pop["z"].astype(np.float64), "ebv": pop["ebv"].astype(np.float32)}
        out.update({f"truth_{k}": v for k, v in pop.items() if k not in ("z", "ebv")})
        out["cat_flags"] = draws.pop("flags")  # what the pipeline knows: interpolated pixels, close neighbours
        out.update({f"truth_{k}": v for k, v in draws.items()})
        out.update({f"cat_{k}": v for k, v in catalogue.items()})
        return out, dereddened(catalogue["petro_mag"], ebv=pop["ebv"])[:, r] <= pop_cfg.r_limit_mag

    return fill(n, batch)
