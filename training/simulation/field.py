"""Simulated survey fields: one calibrated FITS image per band plus a catalogue, with known truth.

    photoz simulate-field --out field/ --n 36 --seed 3

The test bed of ``photoz cutouts``: galaxies of the same population as
``photoz simulate`` placed at known sky positions on a field, one image per
band with its own WCS (the bands' pixel grids are shifted against each other
by a few pixels, as SDSS frames of different filters are), each band in a
different unit convention that real data use:

    r, g   nanomaggies            BUNIT = 'nanomaggy' (SDSS frames, Legacy Surveys)
    u      counts + NMGY          BUNIT = 'count', NMGY = nanomaggies per count
    i      counts + zero point    BUNIT = 'adu', MAGZP (AB mag of one count/pixel)
    z      microjansky            BUNIT = 'uJy'

Also written: ``catalogue.csv`` (id, ra, dec, ebv: what a survey catalogue
gives) and ``truth.npz``: the true redshifts, the true pixel positions, and
each galaxy's **own cutout** (the same galaxy drawn alone, centred, with its
own noise) so that a cutout made from the field can be checked against it.
Objects lie on a jittered grid far enough apart that no neighbour enters
another's 64 x 64 cutout; ``n_edge`` of them sit deliberately too near an
edge of the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from photoz.model.conventions import (
    BANDS,
    CUTOUT_SIZE_PIXELS,
    MEDIAN_SEEING_FWHM_ARCSEC,
    NANOMAGGY_JANSKY,
    NANOMAGGY_ZEROPOINT_MAG,
    PIXEL_SCALE_ARCSEC,
    PSF_MOFFAT_BETA,
)

FIELD_CENTRE_DEG = (150.1, 2.2)  # (RA, Dec) of the reference pixel
#: Pixel shift of each band's grid against r (x, y): SDSS frames of one field are offset by a few arcsec.
BAND_SHIFT_PIXELS = {"u": (3.3, -1.7), "g": (1.2, 0.45), "r": (0.0, 0.0), "i": (-0.8, 2.25), "z": (-2.6, -0.35)}
UNIT_OF_BAND = {"u": "count+NMGY", "g": "nanomaggy", "r": "nanomaggy", "i": "adu+MAGZP", "z": "uJy"}
U_NMGY_PER_COUNT = 0.0052
I_MAGZP = 28.3
STAMP_PIXELS = 96


def band_wcs(band: str, shape: tuple[int, int]):
    """TAN WCS of a band's image: north up, east left, PIXEL_SCALE_ARCSEC, grid shifted by BAND_SHIFT_PIXELS."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    dx, dy = BAND_SHIFT_PIXELS[band]
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(FIELD_CENTRE_DEG)
    w.wcs.crpix = [shape[1] / 2 + 0.5 + dx, shape[0] / 2 + 0.5 + dy]
    w.wcs.cdelt = [-PIXEL_SCALE_ARCSEC / 3600, PIXEL_SCALE_ARCSEC / 3600]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _place(field: np.ndarray, stamp: np.ndarray, x0: int, y0: int) -> None:
    """Add ``stamp`` to ``field`` with its [0, 0] pixel at (x0, y0), clipped to the field."""
    h, w = stamp.shape
    fy0, fx0 = max(y0, 0), max(x0, 0)
    fy1, fx1 = min(y0 + h, field.shape[0]), min(x0 + w, field.shape[1])
    if fy1 > fy0 and fx1 > fx0:
        field[fy0:fy1, fx0:fx1] += stamp[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]


def render_field(out_dir: str | Path, n: int = 36, seed: int = 3, spacing_pixels: int = 120, n_edge: int = 2,
                 noise: bool = True) -> dict:
    """Write the five band images, catalogue.csv and truth.npz to ``out_dir``; return a summary.

    Each own cutout puts its galaxy at the same sub-pixel position as a 64 x 64
    cutout of the field's r-band grid will (within half a pixel of the centre),
    so that without noise (``noise=False``) the r band of a cutout cut from the
    field equals the own cutout, and the other bands differ only by resampling.
    """
    from astropy.table import Table

    from photoz.training.simulation.instrument import add_noise
    from photoz.training.simulation.population import PopulationConfig, draw_selected

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pop = draw_selected(PopulationConfig(), n, rng)
    xy, shape = _positions(rng, n, n_edge, spacing_pixels)
    clean, own_clean = _draw_galaxies(pop, xy, shape)
    noisy = add_noise(clean[None], np.random.default_rng([seed, 1]))[0] if noise else clean
    own = add_noise(own_clean, np.random.default_rng([seed, 2])) if noise else own_clean
    paths = {band: _write_frame(out, band, noisy[b], shape) for b, band in enumerate(BANDS)}
    sky = band_wcs("r", shape).pixel_to_world(xy[:, 0], xy[:, 1])
    ids = np.array([f"field{seed}-{k:04d}" for k in range(n)])
    Table({"id": ids, "ra": sky.ra.deg, "dec": sky.dec.deg, "ebv": pop["ebv"].astype(np.float32)}).write(
        out / "catalogue.csv", format="ascii.csv", overwrite=True)
    near_edge = np.zeros(n, bool)
    near_edge[n - n_edge:] = True
    np.savez(out / "truth.npz", ids=ids, z=pop["z"], x_r=xy[:, 0], y_r=xy[:, 1], near_edge=near_edge,
             images=own, ebv=pop["ebv"].astype(np.float32))
    summary = {"out": str(out), "n": n, "n_near_edge": n_edge, "shape": list(shape),
               "images": {b: str(p) for b, p in paths.items()}, "units": UNIT_OF_BAND, "seed": seed, "noise": noise}
    (out / "field.json").write_text(json.dumps(summary, indent=1))
    return summary


def _positions(rng: np.random.Generator, n: int, n_edge: int, spacing_pixels: int) -> tuple[np.ndarray, tuple]:
    """True r-band pixel positions (0-based pixel centres) of the galaxies, (n, 2): a jittered grid, then the
    ``n_edge`` objects too near the left edge; and the field's shape."""
    n_inner = n - n_edge
    side = int(np.ceil(np.sqrt(n_inner)))
    margin = spacing_pixels // 2  # a strip on the left for the objects too near the edge
    size = side * spacing_pixels + spacing_pixels + margin
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    centres = (np.stack([gx.ravel(), gy.ravel()], 1)[:n_inner] + 1) * spacing_pixels + np.array([margin, 0])
    xy = centres + rng.uniform(-8, 8, centres.shape)
    edge = np.stack([rng.uniform(3, 20, n_edge), rng.uniform(spacing_pixels, size - spacing_pixels, n_edge)], 1)
    return np.concatenate([xy, edge]), (size, size)


def _draw_galaxies(pop: dict, xy: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free field (5, H, W) and each galaxy's own noise-free cutout (n, 5, S, S)."""
    import galsim

    from photoz.training.simulation.drawing import galaxy_profile, gsparams

    params = gsparams()  # the simulator's, shared by every profile
    psfs = [galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=MEDIAN_SEEING_FWHM_ARCSEC[b], gsparams=params) for b in BANDS]
    n = len(xy)
    clean = np.zeros((len(BANDS),) + shape, np.float32)
    own_clean = np.zeros((n, len(BANDS), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS), np.float32)
    half = CUTOUT_SIZE_PIXELS / 2 - 0.5
    for k in range(n):
        row = {key: value[k] for key, value in pop.items()}
        # where the galaxy falls in a cutout of the r grid: the cutter centres it to within half a pixel
        own_offset = tuple(v - np.round(v - half) - half for v in xy[k])
        for b, band in enumerate(BANDS):
            galaxy = galsim.Convolve(galaxy_profile(galsim, row, b, 0.0, 0.0), psfs[b], gsparams=params)
            own_image = galsim.ImageF(CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS, scale=PIXEL_SCALE_ARCSEC)
            own_clean[k, b] = galaxy.drawImage(image=own_image, offset=own_offset).array
            x, y = xy[k] + np.array(BAND_SHIFT_PIXELS[band])
            # the stamp's true centre is at 0-based pixel (STAMP/2 - 0.5); place it at (x, y)
            x0, y0 = int(np.round(x - (STAMP_PIXELS / 2 - 0.5))), int(np.round(y - (STAMP_PIXELS / 2 - 0.5)))
            offset = (x - x0 - (STAMP_PIXELS / 2 - 0.5), y - y0 - (STAMP_PIXELS / 2 - 0.5))
            stamp = galsim.ImageF(STAMP_PIXELS, STAMP_PIXELS, scale=PIXEL_SCALE_ARCSEC)
            galaxy.drawImage(image=stamp, offset=offset)
            _place(clean[b], stamp.array, x0, y0)
    return clean, own_clean


def _write_frame(out: Path, band: str, data: np.ndarray, shape: tuple) -> Path:
    """One band's frame in that band's unit convention (:data:`UNIT_OF_BAND`), with its WCS: its path."""
    from astropy.io import fits

    header = band_wcs(band, shape).to_header()
    header["FILTER"] = (band, "SDSS filter")
    if UNIT_OF_BAND[band] == "nanomaggy":
        header["BUNIT"] = "nanomaggy"
        header["NMGY"] = (0.005, "nMgy per count (data are already in nMgy)")
    elif UNIT_OF_BAND[band] == "count+NMGY":
        header["BUNIT"] = "count"
        header["NMGY"] = (U_NMGY_PER_COUNT, "nanomaggies per count")
        data = data / U_NMGY_PER_COUNT
    elif UNIT_OF_BAND[band] == "adu+MAGZP":
        header["BUNIT"] = "adu"
        header["MAGZP"] = (I_MAGZP, "AB magnitude of 1 adu")
        data = data * 10 ** (0.4 * (I_MAGZP - NANOMAGGY_ZEROPOINT_MAG))
    else:
        header["BUNIT"] = "uJy"
        data = data * NANOMAGGY_JANSKY * 1e6  # microjansky
    path = out / f"frame-{band}.fits"
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path, overwrite=True)
    return path
