"""FITS cutouts in: a cube, or one image HDU per band, compressed or not; E(B-V) and ids from headers or a table.

Headers are read lazily, at most ``max_hdus`` of them; the HDUs photoz will
use are chosen from their headers alone (a cube, else one 2-D image per band,
and tables with E(B-V) or id columns), their decoded sizes (``NAXISn`` x
``|BITPIX|``, for tile-compressed images the uncompressed ``ZNAXISn`` that
astropy reports) are charged to the request's
:class:`~photoz.formats.cutouts.DecodeBudget`, and only then are their data
read or decompressed. Every other HDU is never read.
"""
from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from photoz.formats.cutouts import UNLIMITED, Cutouts, DecodeBudget, Geometry, finish
from photoz.formats.errors import InputError

FITS_MAGIC = b"SIMPLE  ="
#: Header keywords that name an image's band, in the order they are read.
BAND_KEYWORDS = ("FILTER", "BAND", "EXTNAME")
#: Header keywords read as E(B-V) in mag.
EBV_KEYWORDS = ("EBV", "E_BV", "EBMV")
#: Table columns read as E(B-V) and as ids (case-insensitive).
EBV_COLUMNS, ID_COLUMNS = ("ebv",), ("id", "ids", "objid")


def band_from_header(header: Any, bands: tuple[str, ...], keywords: tuple[str, ...] = BAND_KEYWORDS) -> str | None:
    """The band a FITS header names in FILTER, BAND or EXTNAME (the first keyword that names one).

    A value names a band when it is the band ('r', 'R') or holds exactly one
    band-named token ('SDSS r', 'r.MP9601', 'HSC-R', 'IMAGE_R'); 'g-r' names none.
    """
    lower = {b.lower(): b for b in bands}
    for key in keywords:
        value = str(header.get(key, "")).strip().lower()
        if not value:
            continue
        if value in lower:
            return lower[value]
        tokens = {t for t in re.split(r"[\s._\-/]+", value) if t in lower}
        if len(tokens) == 1:
            return lower[tokens.pop()]
    return None


def _hdus(hdul: Any, max_hdus: int, field: str) -> list[Any]:
    """The file's HDUs, headers only (lazily read), refusing more than ``max_hdus``."""
    hdus: list[Any] = []
    for index in range(max_hdus + 1):
        try:
            hdu = hdul[index]
        except IndexError:
            return hdus
        if index == max_hdus:
            raise InputError(field, f"a FITS file of at most {max_hdus} HDUs", f"more than {max_hdus} HDUs",
                             status=413, title="request too large")
        hdus.append(hdu)
    return hdus


def _image_shape(hdu: Any) -> tuple[int, ...]:
    return tuple(hdu.shape) if hdu.is_image and hdu.header.get("NAXIS", 0) else ()


def _image_data(hdu: Any, index: int, field: str, budget: DecodeBudget) -> np.ndarray:
    """An image HDU's data, once its decoded size is charged (scaled integers become float64)."""
    shape = _image_shape(hdu)
    scaled = "BSCALE" in hdu.header or "BZERO" in hdu.header
    itemsize = 8 if scaled else abs(int(hdu.header["BITPIX"])) // 8
    budget.take(int(np.prod(shape, dtype=np.int64)), itemsize, f"{field}[HDU {index}]", f"an image of shape {shape}")
    return np.asarray(hdu.data)


def _header_ebv(hdus: list[Any], field: str) -> float | None:
    for index, hdu in enumerate(hdus):
        for key in EBV_KEYWORDS:
            if key in hdu.header:
                value = hdu.header[key]
                if isinstance(value, (bool, complex, str)) or not isinstance(value, (int, float)):
                    raise InputError(f"{field}[HDU {index}] header {key}", "a real number (E(B-V) in mag)",
                                     repr(value)[:80])
                return float(value)
    return None


def _table_values(hdus: list[Any], field: str, budget: DecodeBudget) -> tuple[Any, Any]:
    """E(B-V) and ids from the tables that have such columns (others are never read)."""
    ebv, ids = None, None
    for index, hdu in enumerate(hdus):
        if hdu.is_image or not hasattr(hdu, "columns"):
            continue
        columns = {c.lower(): c for c in hdu.columns.names}
        ebv_col = next((columns[c] for c in EBV_COLUMNS if c in columns), None)
        id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
        if ebv_col is None and id_col is None:
            continue
        where = f"{field}[HDU {index}]"
        budget.take(int(hdu.header.get("NAXIS1", 0)) * int(hdu.header.get("NAXIS2", 0))
                    + int(hdu.header.get("PCOUNT", 0)), 1, where, "a table")
        if ebv_col is not None:
            try:
                ebv = np.asarray(hdu.data[ebv_col], np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{where}.{ebv_col}", "a numeric column (E(B-V) in mag)",
                                 f"a column of format {hdu.columns[ebv_col].format}") from None
        if id_col is not None:
            ids = hdu.data[id_col]
    return ebv, ids


def _stack_from_planes(hdus: list[Any], geometry: Geometry, field: str, budget: DecodeBudget) -> np.ndarray:
    planes = [(i, h) for i, h in enumerate(hdus) if len(_image_shape(h)) == 2]
    if not planes:
        raise InputError(field, "a FITS image: a cube " + geometry.describe() + " or one image HDU per band",
                         "no image data in any HDU")
    by_band: dict[str, list[tuple[int, Any]]] = {}
    for index, hdu in planes:
        band = band_from_header(hdu.header, geometry.bands)
        if band is not None:
            by_band.setdefault(band, []).append((index, hdu))
    missing = [b for b in geometry.bands if b not in by_band]
    duplicated = [b for b, found in by_band.items() if len(found) > 1]
    if missing or duplicated:
        got = (f"no HDU for band(s) {', '.join(missing)}" if missing else "") + \
              (f"; several HDUs for band(s) {', '.join(duplicated)}" if duplicated else "")
        raise InputError(f"{field} (FILTER/BAND/EXTNAME headers)",
                         f"one image HDU per band {', '.join(geometry.bands)}, identified by FILTER, BAND or EXTNAME",
                         got.strip("; "))
    return np.stack([_image_data(by_band[b][0][1], by_band[b][0][0], field, budget) for b in geometry.bands])


def _decode(hdus: list[Any], geometry: Geometry, ebv: Any, ids: Any, field: str, budget: DecodeBudget) -> Cutouts:
    table_ebv, table_ids = _table_values(hdus, field, budget)
    ebv = ebv if ebv is not None else table_ebv if table_ebv is not None else _header_ebv(hdus, field)
    ids = ids if ids is not None else table_ids
    cube = next((i for i, h in enumerate(hdus) if len(_image_shape(h)) >= 3 and np.prod(_image_shape(h))), None)
    if cube is not None:
        return finish(_image_data(hdus[cube], cube, field, budget), geometry, ebv, ids, f"{field}[HDU {cube}]")
    return finish(_stack_from_planes(hdus, geometry, field, budget), geometry, ebv, ids, field)


def decode_fits(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body",
                budget: DecodeBudget | None = None) -> Cutouts:
    from astropy.io import fits

    budget = budget or DecodeBudget(UNLIMITED)
    try:
        hdul = fits.open(io.BytesIO(body), memmap=False, lazy_load_hdus=True)
        with hdul:
            return _decode(_hdus(hdul, budget.limits.max_hdus, field), geometry, ebv, ids, field, budget)
    except InputError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, KeyError... for damaged files
        raise InputError(field, "a FITS file", f"unreadable FITS ({type(exc).__name__}: {str(exc)[:200]})",
                         status=400, title="unreadable file") from None
