"""``photoz cutouts``: cutouts on the bundle's pixel grid from calibrated field images and a catalogue.

Survey pipelines hold one calibrated image per band and a catalogue of sky
positions, not hand-made cutouts. This module

1. reads one FITS image per band (band from ``BAND=path`` or the ``FILTER`` /
   ``BAND`` header) and converts its pixels to nanomaggies per pixel from the
   header (:func:`nanomaggies_per_unit`);
2. puts every band on the r band's pixel grid: bands whose WCS differs are
   resampled with ``reproject`` (bicubic interpolation, then multiplied by
   the ratio of pixel areas so that pixel values stay fluxes per pixel); if
   the r band's pixel scale is not the bundle's, all bands are resampled onto
   a grid with the r band's orientation at the bundle's scale;
3. reads the catalogue (FITS, CSV or Parquet: RA/Dec in degrees, optional
   ids and E(B-V)), and cuts a ``size`` x ``size`` stamp around each object
   from the aligned images: the object lies within half a pixel of the stamp's
   centre (as in the training data). Pixels beyond the field are NaN and the
   object is flagged ``near_edge``; ``photoz predict`` then reports it
   without a PDF ("non-finite pixel values") instead of guessing.

The result is an ``.npz`` that ``photoz predict`` and the service read
directly (``images``, ``ebv``, ``ids``, plus ``ra``, ``dec``, ``x``, ``y``,
``near_edge``). Nothing here imports torch.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photoz.formats.fits_input import band_from_header
from photoz.model.conventions import (
    BANDS,
    CUTOUT_SIZE_PIXELS,
    NANOMAGGY_JANSKY,
    NANOMAGGY_ZEROPOINT_MAG,
    PIXEL_SCALE_ARCSEC,
)
from photoz.pipeline.jobs import CutoutsJob

REFERENCE_BAND = "r"
ZERO_POINT_KEYWORDS = ("MAGZP", "MAGZERO", "ZEROPT", "PHOTZP", "ZP")
NANOMAGGY_NAMES = {"nanomaggy", "nanomaggies", "nmgy", "nmaggy"}
COUNT_NAMES = {"count", "counts", "adu", "dn", "electron", "electrons", "e-", "ct"}
PIXEL_SCALE_TOLERANCE = 0.01  # relative: closer than this to the bundle's scale counts as the same


class CutoutError(ValueError):
    """Unusable field images or catalogue: says which file, what was expected and what was found."""


@dataclass
class BandImage:
    band: str
    path: Path
    data: np.ndarray  # nanomaggies per pixel, float32
    wcs: Any  # astropy.wcs.WCS (celestial)
    unit_note: str  # how the unit was read, for the log


def nanomaggies_per_unit(header, path: str = "image", unit: str | None = None,
                         zero_point: float | None = None) -> tuple[float, str]:
    """Factor that turns this image's pixel values into nanomaggies, and how it was decided.

    In order: an explicit ``zero_point`` (AB magnitude of one pixel unit);
    an explicit ``unit`` or the ``BUNIT`` keyword: nanomaggy (SDSS frames,
    Legacy Surveys), maggy, or any flux density astropy knows (Jy, uJy, nJy,
    erg/s/cm2/Hz...); counts/ADU with ``NMGY`` (nanomaggies per count, SDSS)
    or a zero point keyword (``MAGZP``, ``MAGZERO``, ``ZEROPT``, ``PHOTZP``,
    ``ZP``: the AB magnitude of one count).
    """
    if zero_point is not None:
        return 10 ** (-0.4 * (float(zero_point) - NANOMAGGY_ZEROPOINT_MAG)), f"zero point {zero_point} (given)"
    raw = unit if unit is not None else header.get("BUNIT")
    name = re.sub(r"[\s/]*(pixel|pix|px)$", "", str(raw).strip()).strip().lower() if raw is not None else ""
    if name in NANOMAGGY_NAMES:
        return 1.0, f"BUNIT {raw!r}"
    if name in {"maggy", "maggies"}:
        return 1e9, f"BUNIT {raw!r}"
    if name and name not in COUNT_NAMES:
        import astropy.units as u

        try:
            factor = u.Unit(raw.strip() if unit is None else unit).to(u.Jy) / NANOMAGGY_JANSKY
            return float(factor), f"BUNIT {raw!r} (flux density)"
        except (ValueError, u.UnitConversionError, TypeError):
            raise CutoutError(f"{path}: BUNIT {raw!r} is not a unit photoz can convert to nanomaggies "
                              "(expected nanomaggy, maggy, a flux density such as Jy or uJy, or counts with "
                              "NMGY or a zero point); give --unit BAND=UNIT or --zero-point BAND=MAG") from None
    if "NMGY" in header:
        return float(header["NMGY"]), f"counts x NMGY = {header['NMGY']}"
    for key in ZERO_POINT_KEYWORDS:
        if key in header:
            zp = float(header[key])
            return 10 ** (-0.4 * (zp - NANOMAGGY_ZEROPOINT_MAG)), f"counts with {key} = {zp}"
    found = f"BUNIT {raw!r}" if raw is not None else "no BUNIT"
    raise CutoutError(f"{path}: cannot tell the pixel unit ({found}, no NMGY, no zero point among "
                      f"{', '.join(ZERO_POINT_KEYWORDS)}); expected nanomaggies or a calibration keyword. "
                      "Give --unit BAND=UNIT or --zero-point BAND=MAG")


def _image_hdu(hdul, path):
    for hdu in hdul:
        if getattr(hdu, "data", None) is not None and hdu.is_image and np.asarray(hdu.data).ndim == 2:
            return hdu
    raise CutoutError(f"{path}: no 2-D image HDU (expected one calibrated image per band)")


def read_band_image(path: str | Path, band: str | None = None, unit: str | None = None,
                    zero_point: float | None = None, bands: tuple[str, ...] = BANDS) -> BandImage:
    """One calibrated image: data in nanomaggies per pixel, celestial WCS, band."""
    from astropy.io import fits
    from astropy.wcs import WCS

    path = Path(path)
    try:
        hdul = fits.open(path)
    except (OSError, ValueError) as exc:
        raise CutoutError(f"{path}: not a readable FITS file ({exc})") from None
    with hdul:
        hdu = _image_hdu(hdul, path)
        header = hdu.header
        if band is None:
            band = band_from_header(header, bands)
        if band not in bands:
            raise CutoutError(f"{path}: band {band!r} is not one of the bundle's bands {bands}; "
                              "name it as BAND=PATH or set the FILTER header")
        wcs = WCS(header).celestial
        if not wcs.has_celestial or wcs.naxis != 2:
            raise CutoutError(f"{path}: no celestial WCS in the header (expected RA/Dec axes, e.g. RA---TAN)")
        factor, note = nanomaggies_per_unit(header, str(path), unit, zero_point)
        data = np.asarray(hdu.data, dtype=np.float64) * factor
    return BandImage(band, path, data.astype(np.float32), wcs, note)


def pixel_scale_arcsec(wcs) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.sqrt(np.prod(proj_plane_pixel_scales(wcs))) * 3600)


def _same_grid(a, b, shape_a, shape_b) -> bool:
    if shape_a != shape_b:
        return False
    probe = np.array([[0.0, 0.0], [shape_a[1] - 1.0, shape_a[0] - 1.0], [shape_a[1] / 2, 0.0]])
    sky = a.pixel_to_world(probe[:, 0], probe[:, 1])
    back = np.stack(b.world_to_pixel(sky), 1)
    return bool(np.all(np.abs(back - probe) < 1e-3))


def reference_grid(ref: BandImage, scale_arcsec: float):
    """The grid cutouts are cut from: the r band's own, or its orientation at the bundle's pixel scale."""
    current = pixel_scale_arcsec(ref.wcs)
    if abs(current / scale_arcsec - 1) <= PIXEL_SCALE_TOLERANCE:
        return ref.wcs, ref.data.shape
    zoom = current / scale_arcsec
    wcs = ref.wcs.deepcopy()
    if wcs.wcs.has_cd():
        wcs.wcs.cd = wcs.wcs.cd / zoom
    else:
        wcs.wcs.cdelt = np.asarray(wcs.wcs.cdelt) / zoom
    wcs.wcs.crpix = (np.asarray(ref.wcs.wcs.crpix) - 0.5) * zoom + 0.5
    shape = (int(np.ceil(ref.data.shape[0] * zoom)), int(np.ceil(ref.data.shape[1] * zoom)))
    return wcs, shape


def on_grid(image: BandImage, wcs, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """A band's pixels on the grid (``wcs``, ``shape``), in nanomaggies per pixel of that grid, and how: as they
    are when the band is already on it, else resampled with ``reproject`` (bicubic) times the pixel-area ratio."""
    if _same_grid(image.wcs, wcs, image.data.shape, shape):
        return image.data, "on the reference grid"
    try:
        from reproject import reproject_interp
    except ImportError:
        raise CutoutError(f"{image.path}: the {image.band} band's pixel grid differs from the reference grid and "
                          "resampling needs the reproject package: pip install 'photoz[pipeline]' "
                          "(or '.[pipeline]' in a checkout)") from None
    from astropy.wcs.utils import proj_plane_pixel_area

    resampled, _ = reproject_interp((image.data, image.wcs), wcs, shape_out=shape, order="bicubic")
    area_ratio = proj_plane_pixel_area(wcs) / proj_plane_pixel_area(image.wcs)
    return (resampled * area_ratio).astype(np.float32), f"resampled with reproject (bicubic, pixel area " \
                                                         f"x{area_ratio:.4f})"


def align(images: dict[str, BandImage], scale_arcsec: float = PIXEL_SCALE_ARCSEC):
    """Every band on one grid (nanomaggies per pixel of that grid); returns (stack (B,H,W), wcs, notes)."""
    if REFERENCE_BAND not in images:
        raise CutoutError(f"no {REFERENCE_BAND}-band image: the cutouts are aligned to the {REFERENCE_BAND} band's WCS")
    wcs, shape = reference_grid(images[REFERENCE_BAND], scale_arcsec)
    stack, notes = [], {}
    for band in BANDS:
        data, how = on_grid(images[band], wcs, shape)
        stack.append(data)
        notes[band] = f"{images[band].unit_note}; {how}"
    return np.stack(stack), wcs, notes


def stamp_origin(x: float, y: float, size: int) -> tuple[int, int]:
    """The 0-based pixel where the stamp of an object at (x, y) starts: the object within half a pixel of the
    stamp's true centre (as in the training data)."""
    half = size / 2 - 0.5  # 0-based position of a stamp's true centre
    return int(np.round(x - half)), int(np.round(y - half))


def cut_registered(images: dict[str, BandImage], ra: np.ndarray, dec: np.ndarray, size: int = CUTOUT_SIZE_PIXELS,
                   scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> tuple[np.ndarray, np.ndarray]:
    """What ``cut(*align(images)[:2], ra, dec)`` gives for stamps that lie inside the reference grid, registering
    only the stamps' own pixels (the same bicubic resampling evaluated at the same positions): for a few objects
    on a large frame, about a hundred times less work. A stamp that runs off the grid is NaN and ``near_edge``.
    Returns (images (N, B, size, size), near_edge (N,))."""
    from astropy.coordinates import SkyCoord

    ref = images[REFERENCE_BAND]
    wcs, (height, width) = reference_grid(ref, scale_arcsec)
    x, y = wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
    out = np.full((len(ra), len(BANDS), size, size), np.nan, np.float32)
    near_edge = np.ones(len(ra), bool)
    for k in range(len(ra)):
        x0, y0 = stamp_origin(float(x[k]), float(y[k]), size)
        if x0 < 0 or y0 < 0 or x0 + size > width or y0 + size > height:
            continue
        stamp_wcs = wcs.deepcopy()
        stamp_wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) - np.array([x0, y0])
        for b, band in enumerate(BANDS):
            if band == REFERENCE_BAND and wcs is ref.wcs:  # the reference grid itself: its pixels as they are
                out[k, b] = ref.data[y0:y0 + size, x0:x0 + size]
            else:
                out[k, b] = on_grid(_around(images[band], stamp_wcs, size), stamp_wcs, (size, size))[0]
        near_edge[k] = not np.isfinite(out[k]).all()
    return out, near_edge


#: Pixels kept around a stamp's footprint when resampling it: the bicubic spline's prefilter reaches
#: 0.268^d of a pixel's value d pixels away, 2e-14 at 24, so the stamp is the same as from the whole image.
SPLINE_MARGIN_PIXELS = 24


def _around(image: BandImage, stamp_wcs, size: int) -> BandImage:
    """The part of ``image`` under a stamp (with :data:`SPLINE_MARGIN_PIXELS` around it): resampling a stamp
    from it equals resampling it from the whole image, at a fraction of the cost."""
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    sky = stamp_wcs.pixel_to_world(corners[:, 0], corners[:, 1])
    x, y = (np.asarray(v, float) for v in image.wcs.world_to_pixel(sky))
    height, width = image.data.shape
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return image
    x0 = int(np.clip(np.floor(x.min()) - SPLINE_MARGIN_PIXELS, 0, width))
    x1 = int(np.clip(np.ceil(x.max()) + SPLINE_MARGIN_PIXELS + 1, 0, width))
    y0 = int(np.clip(np.floor(y.min()) - SPLINE_MARGIN_PIXELS, 0, height))
    y1 = int(np.clip(np.ceil(y.max()) + SPLINE_MARGIN_PIXELS + 1, 0, height))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image
    return BandImage(image.band, image.path, image.data[y0:y1, x0:x1], image.wcs[y0:y1, x0:x1], image.unit_note)


def read_table(path: str | Path) -> Any:
    """An astropy Table from a FITS, CSV, ECSV or Parquet file (CutoutError naming the file if unreadable)."""
    from astropy.table import Table

    path = Path(path)
    fmt = {".csv": "ascii.csv", ".parquet": "parquet", ".pq": "parquet", ".ecsv": "ascii.ecsv"}.get(
        path.suffix.lower())
    try:
        return Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:  # astropy raises many types for unreadable tables
        raise CutoutError(f"{path}: not a readable catalogue (FITS, CSV or Parquet table): {exc}") from None


def read_catalogue(path: str | Path, ra_col: str | None = None, dec_col: str | None = None,
                   id_col: str | None = None, ebv_col: str | None = None) -> dict:
    """ids, ra, dec (degrees) and E(B-V) (None if absent) from a FITS, CSV or Parquet table."""
    table = read_table(path)
    columns = {c.lower(): c for c in table.colnames}

    def pick(given, candidates, what, required=True):
        if given is not None:
            if given not in table.colnames:
                raise CutoutError(f"{path}: no column {given!r} ({what}); columns are {table.colnames}")
            return given
        for name in candidates:
            if name in columns:
                return columns[name]
        if required:
            raise CutoutError(f"{path}: no {what} column (looked for {', '.join(candidates)}; "
                              f"columns are {table.colnames}); name it with the matching --*-col option")
        return None

    ra = pick(ra_col, ("ra", "ra_deg", "raj2000", "alpha_j2000"), "right ascension in degrees")
    dec = pick(dec_col, ("dec", "dec_deg", "dej2000", "decj2000", "delta_j2000"), "declination in degrees")
    ident = pick(id_col, ("id", "objid", "object_id", "source_id", "specobjid", "name"), "object id", False)
    ebv = pick(ebv_col, ("ebv", "e_bv", "e(b-v)", "ebv_sfd"), "E(B-V)", False)
    out: dict[str, Any] = {"ra": np.asarray(table[ra], np.float64), "dec": np.asarray(table[dec], np.float64),
           "ids": np.asarray([str(v) for v in (table[ident] if ident else range(len(table)))]),
           "ebv": np.asarray(table[ebv], np.float32) if ebv else None}
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]) & (np.abs(out["dec"]) <= 90))
    if bad.any():
        raise CutoutError(f"{path}: {int(bad.sum())} rows without a valid RA/Dec in degrees "
                          f"(first: row {int(np.flatnonzero(bad)[0])})")
    return out


def cut(stack: np.ndarray, wcs, ra: np.ndarray, dec: np.ndarray, size: int = CUTOUT_SIZE_PIXELS):
    """Stamps (N, B, size, size) around each position; NaN beyond the image. Returns (images, x, y, near_edge)."""
    from astropy.coordinates import SkyCoord

    x, y = wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
    x, y = np.asarray(x, float), np.asarray(y, float)
    n, (nb, height, width) = len(ra), stack.shape
    images = np.full((n, nb, size, size), np.nan, np.float32)
    near_edge = np.zeros(n, bool)
    for k in range(n):
        x0, y0 = stamp_origin(x[k], y[k], size)
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + size, width), min(y0 + size, height)
        if fx1 > fx0 and fy1 > fy0:
            images[k, :, fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0] = stack[:, fy0:fy1, fx0:fx1]
        near_edge[k] = not (x0 >= 0 and y0 >= 0 and x0 + size <= width and y0 + size <= height) \
            or not np.isfinite(images[k]).all()
    return images, x, y, near_edge


def make_cutouts(job: CutoutsJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cutouts on the bundle's pixel grid from calibrated field images and a catalogue (:class:`CutoutsJob`:
    ``images`` one calibrated FITS image per band, as ``BAND=PATH`` or a path whose ``FILTER``/``BAND`` header
    names the band; ``out`` the ``.npz`` to write, ``.npz`` appended when missing, written atomically; ``model``
    the bundle whose bands, cutout size and pixel scale to use, default the SDSS conventions). ``log``: where
    to report how each band's unit was read and resampled.

    Returns ``out`` (the path written), ``objects``, ``near_edge`` (how many stamps run off an image),
    ``grid_pixel_scale_arcsec`` and ``notes`` per band; raises :class:`CutoutError` naming the file and what
    is wrong with it.
    """
    bands, size, scale = BANDS, CUTOUT_SIZE_PIXELS, PIXEL_SCALE_ARCSEC
    if job.model is not None:
        from photoz.model.bundle import load_bundle

        doc = load_bundle(job.model).metadata.document
        bands, size = tuple(doc["bands"]), int(doc["cutout_size_pixels"])
        scale = float(doc.get("pixel_scale_arcsec", scale))
        if bands != BANDS:
            raise CutoutError(f"bundle bands {bands}: photoz cutouts handles {BANDS}")
    images = _band_images(job, bands)
    stack, wcs, notes = align(images, scale)
    for band in bands:
        log(f"  {band}: {images[band].path} ({notes[band]})")
    cat = read_catalogue(job.catalogue, job.ra_col, job.dec_col, job.id_col, job.ebv_col)
    if cat["ebv"] is None:
        log("  no E(B-V) column in the catalogue: using 0 (give --ebv-col; e.g. SFD values from the survey)")
        cat["ebv"] = np.zeros(len(cat["ra"]), np.float32)
    cutouts, x, y, near_edge = cut(stack, wcs, cat["ra"], cat["dec"], size)
    out = Path(job.out) if str(job.out).lower().endswith(".npz") else Path(f"{job.out}.npz")  # as np.savez writes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, images=cutouts, ebv=cat["ebv"], ids=cat["ids"], ra=cat["ra"], dec=cat["dec"], x=x, y=y,
             near_edge=near_edge, bands=np.asarray(bands))
    tmp.replace(out)  # the cutouts file exists only once complete
    return {"out": str(out), "objects": len(cutouts), "near_edge": int(near_edge.sum()),
            "grid_pixel_scale_arcsec": pixel_scale_arcsec(wcs), "notes": notes}


def _band_images(job: CutoutsJob, bands: tuple[str, ...]) -> dict[str, BandImage]:
    """The job's images by band, one per band of ``bands`` (CutoutError for a missing or a repeated band)."""
    units, zero_points = job.units or {}, job.zero_points or {}
    images: dict[str, BandImage] = {}
    for arg in job.images:
        named, sep, path = arg.partition("=")
        band: str | None = named
        if not sep or named not in bands:  # a plain path (which may itself contain '=')
            band, path = None, arg
        image = read_band_image(path, band, units.get(band or ""), zero_points.get(band or ""), bands)
        if image.band in images:
            raise CutoutError(f"two images for band {image.band}: {images[image.band].path} and {path}")
        images[image.band] = image
    missing = [b for b in bands if b not in images]
    if missing:
        raise CutoutError(f"no image for band(s) {', '.join(missing)}: give one calibrated image per band "
                          f"({', '.join(bands)}) as BAND=PATH or with a FILTER header")
    return images
