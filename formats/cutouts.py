"""Cutout stacks and their validation, shared by every decoder: layout, dtype, E(B-V), ids, limits.

Only layout, dtype and validation happen here; pixel values go to the model
untouched (normalisation is inside the ONNX graph). Every problem is an
:class:`InputError` naming the field, what was expected and what arrived.
:class:`DecodeBudget` is how a decoder learns, before it allocates or
decompresses anything, whether the result would exceed the request's limits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from photoz.formats.errors import InputError
from photoz.model.conventions import CHANNEL_FIRST_AXIS, EBV_RANGE_MAG, MAX_ABS_PIXEL_NMGY, stack_band_axis

MiB = 2**20


@dataclass(frozen=True)
class DecodeLimits:
    """How much one request may decode to; None: unlimited (the pipeline reading the user's own files)."""

    max_decoded_bytes: int | None = None
    max_hdus: int = 64
    max_parts: int = 64
    max_json_bytes: int | None = None


UNLIMITED = DecodeLimits()


class DecodeBudget:
    """The decoded bytes of one request so far (all its parts), refused with 413 past the limit."""

    def __init__(self, limits: DecodeLimits = UNLIMITED) -> None:
        self.limits, self.used = limits, 0

    def take(self, count: int, itemsize: int, field: str, what: str | Callable[[], str]) -> None:
        """Account for ``count`` values of ``itemsize`` bytes (at least float32's 4: the stack the model gets).
        ``what`` names the array in the refusal (a callable: formatted only for a refusal)."""
        nbytes = int(count) * max(int(itemsize), 4)
        limit = self.limits.max_decoded_bytes
        self.used += nbytes
        if limit is not None and self.used > limit:
            what = what() if callable(what) else what
            raise InputError(field, f"at most {limit / MiB:.0f} MiB of decoded arrays per request (the server's "
                             "max_decoded_mb; send large stacks in several requests)",
                             f"{what}: {nbytes / MiB:.1f} MiB decoded ({self.used / MiB:.1f} MiB in this request)",
                             status=413, title="request too large")


@dataclass
class Cutouts:
    """A validated stack: images (N, bands, S, S) float32, ebv (N,), ids, per-object problems."""

    images: np.ndarray
    ebv: np.ndarray
    ids: list[str]
    problems: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def set_ebv(self, values: Any, field: str = "ebv") -> None:
        """E(B-V) given beside the cutouts (a request's query or form, one value or one per cutout): a value out
        of range is that object's problem, like a bad pixel; a wrong count or a non-number is the request's."""
        self.ebv, problems = ebv_per_object(values, len(self), field)
        self.problems = [merge_problems(a, b) for a, b in zip(self.problems, problems, strict=True)]


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


def flag_unusable_pixels(images: np.ndarray, bands: tuple[str, ...]) -> list[str | None]:
    """Each cutout's problem with its pixels (None: none): NaN or infinite values, or values beyond any physical
    flux (|f| > :data:`~photoz.model.conventions.MAX_ABS_PIXEL_NMGY`, such as a 1e30 mask sentinel), named by
    band with the most extreme value. Such a cutout is refused on its own, before it can join a batch: the
    network's arithmetic is not defined for it, and it must not fail the other cutouts of its batch."""
    # reductions only, no temporary array the size of the stack; a NaN anywhere makes the max NaN. The whole
    # stack's first (one pass each, the common case), each band's only when something is out of bounds
    flat = images.reshape(-1)  # the ufuncs' own reductions: ndarray.max's Python wrapper costs as much for a cutout
    if not flat.size or (np.maximum.reduce(flat) <= MAX_ABS_PIXEL_NMGY
                         and np.minimum.reduce(flat) >= -MAX_ABS_PIXEL_NMGY):
        return [None] * len(images)
    high, low = images.max(axis=(2, 3)), images.min(axis=(2, 3))  # (N, bands)
    bad = ~((high <= MAX_ABS_PIXEL_NMGY) & (low >= -MAX_ABS_PIXEL_NMGY))
    return [_pixel_problem(hi, lo, row, bands) if row.any() else None
            for hi, lo, row in zip(high, low, bad, strict=True)]


def _pixel_problem(high: np.ndarray, low: np.ndarray, bad: np.ndarray, bands: tuple[str, ...]) -> str:
    non_finite = [b for b, h, lo, x in zip(bands, high, low, bad, strict=True)
                  if x and not (np.isfinite(h) and np.isfinite(lo))]
    extreme = [f"{b} ({h if abs(h) >= abs(lo) else lo:.3g} nanomaggies)"
               for b, h, lo, x in zip(bands, high, low, bad, strict=True) if x and b not in non_finite]
    found = ([f"non-finite pixel values (NaN or inf) in band {', '.join(non_finite)}"] if non_finite else []) + \
        ([f"pixel values beyond any physical flux (|f| > {MAX_ABS_PIXEL_NMGY:.0e} nanomaggies, the brightest star's "
          f"whole flux in one pixel; mask sentinels such as 1e30 must be NaN) in band {', '.join(extreme)}"]
         if extreme else [])
    return "; ".join(found)


def _vector(values: Any, n: int, field: str, kind: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values))
    if arr.size == 1 and n > 1:
        arr = np.repeat(arr, n)
    if arr.shape != (n,):
        raise InputError(field, f"one {kind} per cutout ({n}) or a single value", f"{arr.size} values")
    return arr


def _ebv_numbers(values: Any, n: int, field: str) -> np.ndarray:
    """One float64 E(B-V) per cutout (a single value is repeated); 422 for a wrong count or non-numbers."""
    try:
        return _vector(values, n, field, "E(B-V) in mag").astype(np.float64)
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(field, "numbers (E(B-V) in mag)", repr(values)[:80]) from None


def _ebv_out_of_range(values: np.ndarray) -> np.ndarray:
    low, high = EBV_RANGE_MAG
    return ~(np.isfinite(values) & (values >= low) & (values <= high))


def ebv_per_object(values: Any, n: int, field: str = "ebv") -> tuple[np.ndarray, list[str | None]]:
    """One E(B-V) per cutout (a single value is repeated): a value that is not finite or not in
    :data:`~photoz.model.conventions.EBV_RANGE_MAG` is that object's problem (its value replaced by 0), not the
    whole stack's; a wrong count or a non-number is the stack's (422)."""
    if values is None:
        return np.zeros(n, np.float32), [None] * n
    arr = _ebv_numbers(values, n, field)
    bad = _ebv_out_of_range(arr)
    low, high = EBV_RANGE_MAG
    problems = [f"E(B-V) {v} is not a finite value in {low:g}-{high:g} mag" if b else None
                for v, b in zip(arr, bad, strict=True)]
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
    pixel_problems = flag_unusable_pixels(stack, geometry.bands)
    problems = pixel_problems if not any(ebv_problems) else \
        [merge_problems(a, b) for a, b in zip(pixel_problems, ebv_problems, strict=True)]
    return Cutouts(stack, ebv_values, id_list(ids, n, id_prefix), problems)


def concatenate(parts: list[Cutouts]) -> Cutouts:
    return Cutouts(np.concatenate([p.images for p in parts]), np.concatenate([p.ebv for p in parts]),
                   [i for p in parts for i in p.ids], [x for p in parts for x in p.problems])
