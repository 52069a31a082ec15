"""NumPy cutouts in: ``.npy`` and ``.npz``, with their decoded size known before anything is allocated.

A ``.npy`` header states shape and dtype; an ``.npz`` is a zip archive whose
members are ``.npy`` files. Only stored and deflate members are read (bzip2
and LZMA members are refused: they are how an 800-byte body becomes
gigabytes), only the members photoz uses (``images`` or ``data``, ``ebv``,
``ids``), and each member's header is read and charged to the request's
:class:`~photoz.formats.cutouts.DecodeBudget` before its data. Pickled
objects are never loaded (``allow_pickle=False`` throughout).
"""
from __future__ import annotations

import functools
import io
import math
import re
import zipfile
from typing import IO, Any

import numpy as np

from photoz.formats.cutouts import UNLIMITED, Cutouts, DecodeBudget, Geometry, finish
from photoz.formats.errors import InputError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: Zip member compressions read: the two numpy writes (np.savez, np.savez_compressed).
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
NPZ_IMAGES, NPZ_EBV, NPZ_IDS = ("images", "data"), "ebv", "ids"


def _unreadable(field: str, what: str, exc: BaseException) -> InputError:
    return InputError(field, f"{what} (NumPy format, no pickled objects)", f"unreadable data ({exc})", status=400,
                      title="unreadable file")


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from a .npy header, reading the header only."""
    version = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = reader(stream)
    return tuple(shape), dtype


def _charge(budget: DecodeBudget, shape: tuple[int, ...], dtype: np.dtype[Any], field: str) -> None:
    if dtype.hasobject:
        raise InputError(field, "a numeric array (pickled Python objects are not loaded: allow_pickle=False)",
                         f"dtype {dtype}", status=400, title="unreadable file")
    budget.take(math.prod(shape), dtype.itemsize, field, lambda: f"an array of shape {shape}, {dtype}")


def read_npy(body: bytes, field: str, budget: DecodeBudget) -> np.ndarray:
    """A .npy body as an array: a view of the body where numpy's own header allows, else ``np.load``."""
    if not body.startswith(NPY_MAGIC):
        raise InputError(field, "a .npy file (starting with the \\x93NUMPY magic)", f"bytes {body[:8]!r}",
                         status=400, title="unreadable file")
    view = npy_view(body)  # the header numpy writes: a view of the body, nothing allocated
    if view is not None:
        _charge(budget, view.shape, view.dtype, field)
        return view
    try:  # any other header: parsed by numpy (slower) and charged before np.load allocates
        shape, dtype = _npy_header(io.BytesIO(body))
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError... for bad headers
        raise _unreadable(field, "a .npy file", exc) from None
    _charge(budget, shape, dtype, field)
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        raise _unreadable(field, "a .npy file", exc) from None


def decode_npy(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body",
               budget: DecodeBudget | None = None) -> Cutouts:
    return finish(read_npy(body, field, budget or DecodeBudget(UNLIMITED)), geometry, ebv, ids, field)


#: The header numpy itself writes for a plain little- or big-endian float/int array (format 1.0).
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][fiu][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


@functools.lru_cache(maxsize=32)
def _dtype(descr: bytes) -> np.dtype[Any]:
    return np.dtype(descr.decode())


def npy_view(body: bytes) -> np.ndarray | None:
    """A .npy body as a read-only view without copying, for the header numpy writes; None for anything
    else (np.load then reads it). Parsing numpy's header with ``ast`` costs more than a one-cutout request."""
    if body[6:8] != b"\x01\x00" or len(body) < 10:
        return None
    end = 10 + int.from_bytes(body[8:10], "little")
    match = _NPY_HEADER.fullmatch(body, 10, end)
    if match is None:
        return None
    shape = tuple(int(x) for x in match.group(2).split(b",") if x.strip())
    dtype = _dtype(match.group(1))
    count = math.prod(shape)
    if len(body) - end != count * dtype.itemsize:
        return None  # let np.load give its own error
    return np.frombuffer(body, dtype, count, end).reshape(shape)


def _npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, field: str, budget: DecodeBudget) -> np.ndarray:
    if info.compress_type not in ZIP_METHODS:
        raise InputError(field, "an .npz whose members are stored or deflate-compressed (np.savez, "
                         "np.savez_compressed)", f"member {info.filename!r} compressed with method "
                         f"{info.compress_type}", status=415, title="unsupported media type")
    with archive.open(info) as member:
        shape, dtype = _npy_header(member)
    _charge(budget, shape, dtype, field)
    with archive.open(info) as member:  # the declared size bounds what the decompressor may write
        array: np.ndarray = np.lib.format.read_array(member, allow_pickle=False)
    return array


def decode_npz(body: bytes, geometry: Geometry, ebv: Any = None, ids: Any = None, field: str = "body",
               budget: DecodeBudget | None = None) -> Cutouts:
    budget = budget or DecodeBudget(UNLIMITED)
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    except Exception as exc:
        raise _unreadable(field, "an .npz file", exc) from None
    key = next((k for k in NPZ_IMAGES if k in members), None)
    if key is None:
        raise InputError(field, "an .npz with an array named 'images' (or 'data')", f"arrays {sorted(members)}")
    wanted = {key: f"{field}[{key}]"}
    if ebv is None and NPZ_EBV in members:
        wanted[NPZ_EBV] = f"{field}[{NPZ_EBV}]"
    if ids is None and NPZ_IDS in members:
        wanted[NPZ_IDS] = f"{field}[{NPZ_IDS}]"
    arrays = {}
    for name, where in wanted.items():
        try:
            arrays[name] = _npz_member(archive, members[name], where, budget)
        except InputError:
            raise
        except Exception as exc:  # zipfile.BadZipFile (CRC, truncation), numpy's ValueError...
            raise _unreadable(where, "an .npz member", exc) from None
    return finish(arrays[key], geometry, arrays.get(NPZ_EBV, ebv), arrays.get(NPZ_IDS, ids), wanted[key])
