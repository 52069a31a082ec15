"""Decode request bodies (FITS, NumPy .npy/.npz, JSON, multipart) into cutout stacks.

Only layout, dtype and validation happen here; pixel values go to the model
untouched (normalisation is inside the ONNX graph). Every problem is an
:class:`InputError` naming the field, what was expected and what arrived.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from photoz.formats.errors import InputError
from photoz.model.conventions import CHANNEL_FIRST_AXIS, stack_band_axis

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
FITS_MAGIC = b"SIMPLE  ="
#: Header keywords that name an image's band, in the order they are read.
BAND_KEYWORDS = ("FILTER", "BAND", "EXTNAME")


@dataclass
class Cutouts:
    """A validated stack: images (N, bands, S, S) float32, ebv (N,), ids, per-object problems."""

    images: np.ndarray
    ebv: np.ndarray
    ids: list[str]
    problems: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Geometry:
    bands: tuple[str, ...]
    size: int

    def describe(self) -> str:
        nb, s = len(self.bands), self.size
        return f"{nb} bands ({', '.join(self.bands)}) of {s}x{s} pixels: ({nb}, {s}, {s}) or (N, {nb}, {s}, {s}), " \
               f"or channel-last ({s}, {s}, {nb}) / (N, {s}, {s}, {nb})"


def canonical_stack(array: Any, geometry: Geometry, field: str) -> np.ndarray:
    """Any accepted layout -> (N, bands, S, S) float32; the band axis is found by its length."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise InputError(field, "a real numeric array (float or integer pixels)", f"dtype {array.dtype}")
    nb, s = len(geometry.bands), geometry.size
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise InputError(field, geometry.describe(), f"an array of shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(field, "at least one cutout", "an empty stack (0 cutouts)", status=422)
    axis = stack_band_axis(array.shape, nb, s)
    if axis is not None:
        stack = array if axis == CHANNEL_FIRST_AXIS else np.moveaxis(array, axis, CHANNEL_FIRST_AXIS)
    else:
        shape = array.shape[1:]
        if shape[0] == shape[1] and shape[2] != nb and shape[0] != nb:
            got = f"{shape[2]} bands in channel-last shape {array.shape}" if shape[0] == s else \
                f"shape {array.shape}"
        elif shape[1] == shape[2] and shape[1] == s:
            got = f"{shape[0]} bands in shape {array.shape}"
        elif nb in (shape[0], shape[2]):
            side = shape[1:] if shape[0] == nb else shape[:2]
            got = f"{side[0]}x{side[1]}-pixel cutouts in shape {array.shape}"
        else:
            got = f"shape {array.shape}"
        raise InputError(field, geometry.describe(), got)
    return np.ascontiguousarray(stack, dtype=np.float32)


def flag_non_finite(images: np.ndarray, bands: tuple[str, ...]) -> list[str | None]:
    bad = ~np.isfinite(images).all(axis=(2, 3))  # (N, bands)
    return [None if not row.any() else
            "non-finite pixel values (NaN or inf) in band " + ", ".join(b for b, x in zip(bands, row, strict=True) if x)
            for row in bad]


def _vector(values: Any, n: int, field: str, kind: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values))
    if arr.size == 1 and n > 1:
        arr = np.repeat(arr, n)
    if arr.shape != (n,):
        raise InputError(field, f"one {kind} per cutout ({n}) or a single value", f"{arr.size} values")
    return arr


def ebv_vector(values: Any, n: int, field: str = "ebv") -> np.ndarray:
    if values is None:
        return np.zeros(n, np.float32)
    try:
        arr = _vector(values, n, field, "E(B-V) in mag").astype(np.float64)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(field, "numbers (E(B-V) in mag)", repr(values)[:80]) from None
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 10):
        raise InputError(field, "finite E(B-V) values between 0 and 10 mag", f"{arr[~((arr >= 0) & (arr <= 10))][:3]}")
    return arr.astype(np.float32)


def ebv_per_object(values: Any, n: int, field: str = "ebv") -> tuple[np.ndarray, list[str | None]]:
    """E(B-V) carried by a file, one value per cutout: a value that is not finite or not in 0-10 mag is
    that object's problem (its value replaced by 0), not the whole file's; a wrong count is the file's."""
    if values is None:
        return np.zeros(n, np.float32), [None] * n
    try:
        arr = _vector(values, n, field, "E(B-V) in mag").astype(np.float64)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(field, "numbers (E(B-V) in mag)", repr(values)[:80]) from None
    bad = ~(np.isfinite(arr) & (arr >= 0) & (arr <= 10))
    problems = [f"E(B-V) {v} is not a finite value in 0-10 mag" if b else None for v, b in zip(arr, bad, strict=True)]
    return np.where(bad, 0.0, arr).astype(np.float32), problems


def merge_problems(*problems: str | None) -> str | None:
    """One object's problems as one message (None when it has none)."""
    found = list(dict.fromkeys(p for p in problems if p))  # each message once, in order
    return "; ".join(found) if found else None


def id_list(values: Any, n: int, default_prefix: str = "") -> list[str]:
    if values is None:
        return [f"{default_prefix}{i}" for i in range(n)]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)  # FITS/HDF5 strings are bytes
            for v in _vector(values, n, "ids", "id").tolist()]


def finish(images: Any, geometry: Geometry, ebv: Any, ids: Any, field: str, id_prefix: str = "") -> Cutouts:
    stack = canonical_stack(images, geometry, field)
    n = stack.shape[0]
    ebv_values, ebv_problems = ebv_per_object(ebv, n)
    problems = [merge_problems(a, b) for a, b in zip(flag_non_finite(stack, geometry.bands), ebv_problems,
                                                     strict=True)]
    return Cutouts(stack, ebv_values, id_list(ids, n, id_prefix), problems)


# -- formats -----------------------------------------------------------------

def decode_npy(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body") -> Cutouts:
    if not body.startswith(NPY_MAGIC):
        raise InputError(field, "a .npy file (starting with the \\x93NUMPY magic)", f"bytes {body[:8]!r}",
                         status=400, title="unreadable file")
    try:
        array = _npy_fast(body)
        if array is None:
            array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError... for bad files
        raise InputError(field, "a .npy file (NumPy format, no pickled objects)", f"unreadable data ({exc})",
                         status=400, title="unreadable file") from None
    return finish(array, geometry, ebv, ids, field)


#: The header numpy itself writes for a plain little- or big-endian float/int array (format 1.0).
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][fiu][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def _npy_fast(body: bytes) -> np.ndarray | None:
    """A .npy body as a read-only view without copying, for the header numpy writes; None for anything
    else (np.load then reads it). Parsing numpy's header with ``ast`` costs more than a one-cutout request."""
    if body[6:8] != b"\x01\x00" or len(body) < 10:
        return None
    end = 10 + int.from_bytes(body[8:10], "little")
    match = _NPY_HEADER.fullmatch(body, 10, end)
    if match is None:
        return None
    shape = tuple(int(x) for x in match.group(2).split(b",") if x.strip())
    dtype = np.dtype(match.group(1).decode())
    count = int(np.prod(shape, dtype=np.int64))
    if len(body) - end != count * dtype.itemsize:
        return None  # let np.load give its own error
    return np.frombuffer(body, dtype, count, end).reshape(shape)


def decode_npz(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body") -> Cutouts:
    try:
        archive = np.load(io.BytesIO(body), allow_pickle=False)
        names = list(archive.files)
        key = "images" if "images" in names else "data" if "data" in names else None
        if key is None:
            raise InputError(field, "an .npz with an array named 'images' (or 'data')",
                             f"arrays {names}", status=422)
        images = archive[key]
        ebv = archive["ebv"] if ebv is None and "ebv" in names else ebv
        ids = archive["ids"] if ids is None and "ids" in names else ids
    except InputError:
        raise
    except Exception as exc:
        raise InputError(field, "an .npz file (NumPy format, no pickled objects)", f"unreadable data ({exc})",
                         status=400, title="unreadable file") from None
    return finish(images, geometry, ebv, ids, f"{field}[{key}]")


def _header_ebv(headers: list[Any]) -> float | None:
    for header in headers:
        for key in ("EBV", "E_BV", "EBMV"):
            if key in header:
                return float(header[key])
    return None


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


def decode_fits(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body") -> Cutouts:
    from astropy.io import fits

    try:
        hdul = fits.open(io.BytesIO(body), memmap=False)
        hdul.verify("silentfix")
        image_hdus = [h for h in hdul if h.is_image and h.data is not None and h.data.size > 0]
        tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
    except Exception as exc:
        raise InputError(field, "a FITS file", f"unreadable FITS ({exc})", status=400, title="unreadable file") \
            from None
    headers = [h.header for h in hdul]
    table_ebv, table_ids = None, None
    for table in tables:
        columns = {c.lower(): c for c in table.columns.names}
        if "ebv" in columns:
            table_ebv = np.asarray(table.data[columns["ebv"]], np.float64)
        for name in ("id", "ids", "objid"):
            if name in columns:
                table_ids = table.data[columns[name]]
    ebv = ebv if ebv is not None else table_ebv if table_ebv is not None else _header_ebv(headers)
    ids = ids if ids is not None else table_ids
    cubes = [h for h in image_hdus if h.data.ndim >= 3]
    if cubes:
        return finish(cubes[0].data, geometry, ebv, ids, f"{field}[HDU {hdul.index_of(cubes[0])}]")
    planes = [h for h in image_hdus if h.data.ndim == 2]
    by_band: dict[str, list[Any]] = {}
    for h in planes:
        band = band_from_header(h.header, geometry.bands)
        if band is not None:
            by_band.setdefault(band, []).append(h)
    missing = [b for b in geometry.bands if b not in by_band]
    duplicated = [b for b, hs in by_band.items() if len(hs) > 1]
    if not planes:
        raise InputError(field, "a FITS image: a cube " + geometry.describe() + " or one image HDU per band",
                         "no image data in any HDU")
    if missing or duplicated:
        got = (f"no HDU for band(s) {', '.join(missing)}" if missing else "") + \
              (f"; several HDUs for band(s) {', '.join(duplicated)}" if duplicated else "")
        raise InputError(f"{field} (FILTER/BAND/EXTNAME headers)",
                         f"one image HDU per band {', '.join(geometry.bands)}, identified by FILTER, BAND or EXTNAME",
                         got.strip("; "))
    cube = np.stack([np.asarray(by_band[b][0].data) for b in geometry.bands])
    return finish(cube, geometry, ebv, ids, field)


def decode_json(body: bytes, geometry: Geometry, field: str = "body") -> Cutouts:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(field, "a JSON object", f"invalid JSON ({exc})", status=400, title="unreadable body") \
            from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise InputError("images", 'a JSON object {"images": [...], "ebv": ..., "ids": [...]}',
                         f"a JSON {type(doc).__name__} without 'images'")
    try:
        images = np.asarray(doc["images"], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("images", "a rectangular nested list of numbers", "ragged or non-numeric lists") \
            from None
    return finish(images, geometry, doc.get("ebv"), doc.get("ids"), "images")


def sniff(body: bytes) -> str | None:
    if body.startswith(NPY_MAGIC):
        return "npy"
    if body.startswith(ZIP_MAGIC):
        return "npz"
    if body.startswith(FITS_MAGIC):
        return "fits"
    return None


MEDIA_TYPES = {
    "application/fits": "fits", "image/fits": "fits",
    "application/x-npy": "npy", "application/npy": "npy",
    "application/x-npz": "npz", "application/zip": "npz",
    "application/octet-stream": "sniff",
    "application/json": "json",
}
#: Input kinds by file suffix (the longest matching suffix wins): the one table for every reader.
INPUT_SUFFIXES = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".fz": "fits", ".fits.gz": "fits",
                  ".fit.gz": "fits", ".fits.fz": "fits", ".npy": "npy", ".npz": "npz", ".json": "json",
                  ".h5": "hdf5", ".hdf5": "hdf5"}
#: The media type a client sends for each kind.
KIND_MEDIA_TYPES = {"fits": "application/fits", "npy": "application/x-npy", "npz": "application/x-npz",
                    "json": "application/json"}


def kind_for_suffix(name: str) -> str | None:
    """The input kind of a file name by its longest known suffix (``.fits.gz`` -> fits), or None."""
    lower = name.lower()
    matches = [ext for ext in INPUT_SUFFIXES if lower.endswith(ext)]
    return INPUT_SUFFIXES[max(matches, key=len)] if matches else None


def decode(body: bytes, kind: str, geometry: Geometry, ebv: Any = None, ids: Any = None,
           field: str = "body") -> Cutouts:
    """Decode one payload of a known kind (fits, npy, npz, json, or sniff)."""
    if kind == "sniff":
        sniffed = sniff(body)
        if sniffed is None:
            raise InputError(field, "a .npy, .npz or FITS file (recognised by its first bytes)",
                             f"unrecognised bytes {body[:8]!r}", status=415, title="unsupported media type")
        kind = sniffed
    if not body:
        raise InputError(field, "a non-empty body", "0 bytes", status=422)
    if kind == "json":
        cut = decode_json(body, geometry, field)
        if ebv is not None or ids is not None:
            cut.ebv = ebv_vector(ebv, len(cut)) if ebv is not None else cut.ebv
            cut.ids = id_list(ids, len(cut)) if ids is not None else cut.ids
        return cut
    return {"fits": decode_fits, "npy": decode_npy, "npz": decode_npz}[kind](body, geometry, ebv, ids, field)


def kind_for_filename(name: str | None, content_type: str | None) -> str:
    """The kind of an uploaded part: by file name, else by its media type, else sniffed from its bytes."""
    kind = kind_for_suffix(name or "")
    if kind is not None and kind != "hdf5":
        return kind
    base = (content_type or "").split(";")[0].strip().lower()
    return MEDIA_TYPES.get(base, "sniff")


def concatenate(parts: list[Cutouts]) -> Cutouts:
    return Cutouts(np.concatenate([p.images for p in parts]), np.concatenate([p.ebv for p in parts]),
                   [i for p in parts for i in p.ids], [x for p in parts for x in p.problems])


def parse_list_field(raw: str | None, field: str) -> Any:
    """A form/query value: a JSON list, a comma-separated list, or one value."""
    if raw is None or raw == "":
        return None
    raw = raw.strip()
    if raw.startswith("["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise InputError(field, "a JSON list or comma-separated values", raw[:80]) from None
    items = [x.strip() for x in raw.split(",")]
    return items if len(items) > 1 else items[0]
