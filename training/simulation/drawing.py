"""Drawing galaxies and stars with GalSim: the PSF (a Moffat core, a Gaussian wing, a shear) and its Fourier
transform, one band at a time (`draw`) or every band from one set of k-images (`draw_bands`), the bulge + disk
profiles of a galaxy, and the bicubic resampling of a band onto the reference grid."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from photoz.model.conventions import (
    CUTOUT_SIZE_PIXELS,
    PIXEL_SCALE_ARCSEC,
    PSF_MOFFAT_BETA,
    mag_to_nanomaggies,
)

#: Looser than GalSim's defaults (folding 5e-3): flux lost to aliasing stays
#: below 1%, far under the sky noise of a cutout, and drawing is ~2x faster.
GSPARAMS = {"folding_threshold": 1e-2, "maxk_threshold": 3e-3}


#: The cutout's FFT period is this many times GalSim's folding radius pi / stepk (plus the cutout's half-width;
#: :func:`stamp_k_grid`). 1.0 keeps GalSim's folding guarantee (under ``folding_threshold`` of the flux) for the
#: cutout; 1.25 gives the accuracy of GalSim's own larger grids (a stamp's flux within 1e-5 of a drawing with
#: folding 1e-5, where 1.0 left 1e-3 for a large bulge), for ~8% of the time.
FOLDING_MARGIN = 1.25


@functools.lru_cache(maxsize=1)


def gsparams():
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

    params = gsparams()
    psf = galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=fwhm, gsparams=params)
    if shape is None:
        return psf
    if shape.wing_fraction > 0:
        wing = galsim.Gaussian(fwhm=fwhm * shape.wing_fwhm_ratio, gsparams=params)
        psf = galsim.Add([psf * (1 - shape.wing_fraction), wing * shape.wing_fraction], gsparams=params)
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

    params = gsparams()
    psf = psf_profile(psf_fwhm_arcsec, psf_shape)
    image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=PIXEL_SCALE_ARCSEC)
    galsim.Convolve(galsim.Add(profiles), psf, gsparams=params).drawImage(image=image, method="auto")
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
    factor on the same k-image). This is GalSim's own split of ``drawFFT`` into the k-image, the profiles'
    k-images and the inverse transform, which its documentation suggests for reusing k-images, with the
    k-grid sized for the cutout (:func:`stamp_k_grid`) and every image's inverse transform done at once in
    single precision (after GalSim's Hermitian wrap, as ``drawFFT_finish`` does).
    """
    import galsim

    widths = np.asarray(psf_fwhm_arcsec, dtype=float) * (1.0 / PIXEL_SCALE_ARCSEC)  # pixels
    kimage, period, component_k, pixel_k = _k_images(components, widths, psf_shape)
    bounds = kimage.bounds
    kx = np.arange(bounds.xmin, bounds.xmax + 1) * kimage.scale
    ky = np.arange(bounds.ymin, bounds.ymax + 1) * kimage.scale
    n_bands = len(widths)
    with_first = first_components is not None and first_components < len(components)
    # every image's k-image wrapped onto the FFT period (GalSim's Hermitian wrap), then one inverse FFT for all
    wrapped = np.empty((2 * n_bands if with_first else n_bands, period, period // 2 + 1), np.complex64)
    wrap_bounds = galsim.BoundsI(0, period // 2, -period // 2, period // 2 - 1)
    fluxes = np.asarray(fluxes_nmgy, dtype=np.float32)
    psf_ks = psf_k_images(kx, ky, widths, psf_shape)  # every band's PSF at once, in numpy
    for band in range(n_bands):
        psf_k = psf_ks[band] * pixel_k
        if band_shifts_pixels is not None and np.any(band_shifts_pixels[band]):
            dx, dy = band_shifts_pixels[band]
            psf_k *= np.exp(-1j * ky * dy)[:, None] * np.exp(-1j * kx * dx)[None, :]
        scene = fluxes[band, 0] * component_k[0]  # a few multiply-adds: no BLAS call (its threads fight workers)
        for c in range(1, len(components)):
            if with_first and c == first_components:
                kimage.array[...] = scene * psf_k
                wrapped[n_bands + band] = kimage.wrap(wrap_bounds, hermitian="x").array
            scene += fluxes[band, c] * component_k[c]
        kimage.array[...] = scene * psf_k
        wrapped[band] = kimage.wrap(wrap_bounds, hermitian="x").array
    images = _inverse_fft_cutouts(wrapped, period)
    if first_components is None:
        return images[:n_bands]
    return images[:n_bands], (images[n_bands:] if with_first else images[:n_bands].copy())


def _inverse_fft_cutouts(wrapped: np.ndarray, period: int) -> np.ndarray:
    """The central cutouts (M, S, S) float32 of the real images whose wrapped k-images (M, period, period / 2 + 1;
    ky from -period / 2, kx from 0, as GalSim's Hermitian wrap leaves them) are ``wrapped``: GalSim's
    ``drawFFT_finish`` for a stack at once, in single precision (scipy's FFT; the pixels are float32 anyway)."""
    from scipy import fft

    real = fft.irfft2(np.fft.ifftshift(wrapped, axes=1), s=(period, period), axes=(1, 2), workers=1)
    rows = (np.arange(CUTOUT_SIZE_PIXELS) - CUTOUT_SIZE_PIXELS // 2) % period  # pixel 0 is the centre
    return np.ascontiguousarray(real[:, rows][:, :, rows], dtype=np.float32)


def stamp_k_grid(stepk: float, maxk: float) -> tuple:
    """The k-image (GalSim ``ImageCF``, k in radians per pixel) and the real-space FFT size (pixels) to draw a
    profile with GalSim's ``stepk`` and ``maxk`` (per pixel) onto the cutout, as ``drawFFT_makeKImage`` makes
    them but sized for the cutout rather than the whole profile.

    GalSim sizes the FFT so that all but ``folding_threshold`` of the flux lies within half its period,
    R = pi / stepk, of the centre: nothing beyond R folds anywhere. Only the cutout is kept, though, and light
    folds into it from a distance of at least the period less the cutout's half-width: a period of
    R + S / 2 + 1 (S the cutout's size) gives the cutout the same guarantee; the period used is
    ``FOLDING_MARGIN`` R + S / 2 + 1. For a large or far-off profile that is about two thirds of GalSim's period,
    and no 128-pixel minimum applies (the cutout is 64): a quarter to a half of the pixels to transform. The k
    range (``maxk``, with GalSim's wrapping beyond it) is GalSim's."""
    import galsim

    reach = int(np.ceil(FOLDING_MARGIN * np.pi / stepk)) + CUTOUT_SIZE_PIXELS // 2 + 1
    period = galsim.Image.good_fft_size(max(reach, CUTOUT_SIZE_PIXELS))
    dk = 2 * np.pi / period
    n_k = period if period * dk / 2 > maxk else int(np.ceil(maxk / dk)) * 2
    return galsim.ImageCF(bounds=galsim.BoundsI(0, n_k // 2, -n_k // 2, n_k // 2), scale=dk), period


def _k_images(components: list, widths: np.ndarray, psf_shape: PSFShape | None) -> tuple:
    """What :func:`draw_bands` draws every band from: the k-image grid the most demanding band needs (the
    widest PSF sets the period, the narrowest the k range: :func:`stamp_k_grid`) and the FFT period, each
    component's k-image and the pixel response's (pixel coordinates, origin on the cutout's true centre)."""
    import galsim

    params = gsparams()
    inverse_scale = 1.0 / PIXEL_SCALE_ARCSEC
    # image coordinates (pixels); origin on the cutout's true centre, half a pixel off the integer centre
    shapes = [c.dilate(inverse_scale).shift(-0.5, -0.5) for c in components]
    pixel = galsim.Pixel(1.0, gsparams=params)
    total = galsim.Add(shapes, gsparams=params)
    widest, narrowest = (galsim.Convolve(total, psf_profile(float(widths[b]), psf_shape), pixel, gsparams=params)
                         for b in (int(widths.argmax()), int(widths.argmin())))
    kimage, period = stamp_k_grid(widest.stepk, narrowest.maxk)

    def k_array(profile) -> np.ndarray:
        profile._drawKImage(kimage)
        return kimage.array.copy()

    component_k = np.stack([k_array(s) for s in shapes])  # (n_components, ky, kx)
    return kimage, period, component_k, k_array(pixel)


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


#: A bulge's de Vaucouleurs profile is cut off at this many half-light radii (GalSim's ``trunc``; SDSS's model fits
#: taper theirs to zero between 7 and 8 effective radii)
DEV_TRUNCATION_HLR = 8.0


def bulge_half_light_radius(r50_arcsec, bulge_fraction):
    """The bulge's half-light radius (arcsec): the galaxy's above a bulge fraction of 0.8, 0.6 of it below."""
    return np.asarray(r50_arcsec) * np.where(np.asarray(bulge_fraction) > 0.8, 1.0, 0.6)


def component_fluxes(mag_bulge, mag_disk, bulge_fraction) -> tuple[np.ndarray, np.ndarray]:
    """The bulge's and the disk's fluxes (..., n_bands) in nanomaggies as drawn: a component with under 1% of
    the light is not drawn (its flux 0) and the other carries the galaxy's whole flux."""
    bulge, disk = mag_to_nanomaggies(np.asarray(mag_bulge)), mag_to_nanomaggies(np.asarray(mag_disk))
    with_bulge = (np.asarray(bulge_fraction) > 0.01)[..., None]
    with_disk = (np.asarray(bulge_fraction) < 0.99)[..., None]
    return (np.where(with_bulge, np.where(with_disk, bulge, bulge + disk), 0.0),
            np.where(with_disk, np.where(with_bulge, disk, bulge + disk), 0.0))


def galaxy_components(galsim, row: dict, dx_arcsec: float, dy_arcsec: float) -> tuple[list, np.ndarray]:
    """Unit-flux bulge and disk profiles of a galaxy and their fluxes (n_bands, n_components) in nanomaggies.
    A component with under 1% of the light is not drawn; the other carries the galaxy's whole flux."""
    r50 = max(float(row["r50_arcsec"]), 0.05)
    beta = float(row["position_angle_deg"]) * galsim.degrees
    parts, fluxes = [], []
    bulge, disk = component_fluxes(row["mag_bulge"], row["mag_disk"], row["bulge_fraction"])
    if row["bulge_fraction"] > 0.01:
        bulge_hlr = float(bulge_half_light_radius(r50, row["bulge_fraction"]))
        parts.append(galsim.DeVaucouleurs(half_light_radius=bulge_hlr, trunc=DEV_TRUNCATION_HLR * bulge_hlr,
                                          gsparams=gsparams())
                     .shear(q=float(row["bulge_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(bulge)
    if row["bulge_fraction"] < 0.99:
        parts.append(galsim.Exponential(half_light_radius=r50, gsparams=gsparams())
                     .shear(q=float(row["disk_q"]), beta=beta).shift(dx_arcsec, dy_arcsec))
        fluxes.append(disk)
    return parts, np.stack(fluxes, axis=1)


#: Exponential: half-light radius over scale length
EXPONENTIAL_HLR_OVER_SCALE = 1.6783469900166605
#: de Vaucouleurs: b_4 of the Sersic profile exp(-b_n (r / R_e)^(1 / n))
DEV_B4 = 7.669249443609247
#: Azimuths (radians, over a quadrant: the profiles are point-symmetric) of :func:`circular_growth`'s integral
_GROWTH_AZIMUTHS = (np.arange(48) + 0.5) * (np.pi / 2 / 48)


@functools.lru_cache(maxsize=1)
def _truncated_dev_growth() -> tuple[np.ndarray, np.ndarray]:
    """The truncated de Vaucouleurs profile's share of its light within radius x (in its own half-light radii,
    truncation included), tabulated on a log grid: (x, share)."""
    from scipy.optimize import brentq
    from scipy.special import gammainc

    def share(x_over_re, trunc_over_re):
        inner = gammainc(8.0, DEV_B4 * np.minimum(x_over_re, trunc_over_re) ** 0.25)
        return inner / gammainc(8.0, DEV_B4 * trunc_over_re ** 0.25)

    # the untruncated R_e (in units of the truncated profile's half-light radius h) with share(h) = 1/2
    re = brentq(lambda c: share(1.0 / c, DEV_TRUNCATION_HLR / c) - 0.5, 0.5, 2.0)
    x = np.concatenate([[0.0], np.geomspace(1e-4, DEV_TRUNCATION_HLR, 4000)])
    return x, share(x / re, DEV_TRUNCATION_HLR / re)


def circular_growth(radii_pixels: np.ndarray, hlr_pixels: np.ndarray, q: np.ndarray, bulge: bool) -> np.ndarray:
    """The share (N, R) of a unit-flux, noise-free component's light within circles of ``radii_pixels`` (R,)
    about its centre: a truncated de Vaucouleurs bulge (``bulge``) or an exponential disk of half-light radius
    ``hlr_pixels`` (N,) sheared to axis ratio ``q`` (N,) as GalSim shears it (area kept), without the PSF (for
    the light far outside the seeing disk). An elliptical profile's light within a circle is the mean over
    azimuth of L(R rho) / rho^2, rho^2 = q cos^2 + sin^2 / q, L the round profile's growth curve."""
    cos2 = np.cos(_GROWTH_AZIMUTHS) ** 2
    q = np.asarray(q, np.float64)[:, None, None]
    rho2 = q * cos2 + (1 - cos2) / q  # (N, 1, A)
    x = radii_pixels[None, :, None] * np.sqrt(rho2) / np.maximum(np.asarray(hlr_pixels, np.float64), 1e-3)[:, None,
                                                                                                          None]
    if bulge:
        table_x, table_share = _truncated_dev_growth()
        inside = np.interp(x, table_x, table_share)
    else:
        y = x * EXPONENTIAL_HLR_OVER_SCALE
        inside = 1.0 - (1.0 + y) * np.exp(-y)
    return (inside / rho2).mean(axis=2)


def galaxy_profile(galsim, row: dict, band_index: int, dx_arcsec: float, dy_arcsec: float):
    """The galaxy in one band: bulge + disk with that band's fluxes (nanomaggies)."""
    parts, fluxes = galaxy_components(galsim, row, dx_arcsec, dy_arcsec)
    return galsim.Add([p * float(f) for p, f in zip(parts, fluxes[band_index], strict=True)])
