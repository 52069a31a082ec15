"""Cutouts in, by kind: which decoder reads a body or a file, and the tables that say so.

The decoders live beside this module (:mod:`~photoz.formats.numpy_input`,
:mod:`~photoz.formats.fits_input`; JSON here); each knows its decoded size
before it allocates and charges it to a :class:`~photoz.formats.cutouts.DecodeBudget`.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from photoz.formats.cutouts import UNLIMITED, Cutouts, DecodeBudget, Geometry, MiB, finish, id_list
from photoz.formats.errors import InputError
from photoz.formats.fits_input import FITS_MAGIC, decode_fits
from photoz.formats.numpy_input import NPY_MAGIC, ZIP_MAGIC, decode_npy, decode_npz


def decode_json(body: bytes, geometry: Geometry, field: str = "body", budget: DecodeBudget | None = None) -> Cutouts:
    """A small JSON body ``{"images": [...], "ebv": ..., "ids": [...]}`` (for tests and quick looks).

    Capped at ``max_json_bytes``: parsed JSON costs about 12 times its size in memory.
    """
    limit = (budget or DecodeBudget(UNLIMITED)).limits.max_json_bytes
    if limit is not None and len(body) > limit:
        raise InputError(field, f"a JSON body of at most {limit / MiB:.0f} MiB (send .npy, .npz or FITS for more)",
                         f"{len(body) / MiB:.1f} MiB", status=413, title="request body too large")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(field, "a JSON object", f"invalid JSON ({exc})", status=400, title="unreadable body") \
            from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise InputError("images", 'a JSON object {"images": [...], "ebv": ..., "ids": [...]}',
                         f"a JSON {type(doc).__name__} without 'images'")
    try:
        images = np.asarray(doc["images"], dtype=np.float64)
    except (TypeError, ValueError, RecursionError):
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
           field: str = "body", budget: DecodeBudget | None = None) -> Cutouts:
    """Decode one payload of a known kind (fits, npy, npz, json, or sniff) within ``budget``'s limits."""
    budget = budget or DecodeBudget(UNLIMITED)
    if kind == "sniff":
        sniffed = sniff(body)
        if sniffed is None:
            raise InputError(field, "a .npy, .npz or FITS file (recognised by its first bytes)",
                             f"unrecognised bytes {body[:8]!r}", status=415, title="unsupported media type")
        kind = sniffed
    if not body:
        raise InputError(field, "a non-empty body", "0 bytes", status=422)
    if kind == "json":
        cut = decode_json(body, geometry, field, budget)
        if ebv is not None or ids is not None:
            if ebv is not None:
                cut.set_ebv(ebv)
            cut.ids = id_list(ids, len(cut)) if ids is not None else cut.ids
        return cut
    decoder = {"fits": decode_fits, "npy": decode_npy, "npz": decode_npz}[kind]
    return decoder(body, geometry, ebv, ids, field, budget)


def kind_for_filename(name: str | None, content_type: str | None) -> str:
    """The kind of an uploaded part: by file name, else by its media type, else sniffed from its bytes."""
    kind = kind_for_suffix(name or "")
    if kind is not None and kind != "hdf5":
        return kind
    base = (content_type or "").split(";")[0].strip().lower()
    return MEDIA_TYPES.get(base, "sniff")


def parse_list_field(raw: str | None, field: str) -> Any:
    """A form/query value: a JSON list, a comma-separated list, or one value."""
    if raw is None or raw == "":
        return None
    raw = raw.strip()
    if raw.startswith("["):
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise InputError(field, "a JSON list or comma-separated values", raw[:80]) from None
    items = [x.strip() for x in raw.split(",")]
    return items if len(items) > 1 else items[0]
