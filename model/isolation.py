"""One bad object never fails another: a failed call over a batch is bisected so that only its culprits fail.

A model call runs many objects at once (the service batches several clients'
cutouts together; ``photoz predict`` runs a file's rows in batches). When it
raises, :func:`isolate` re-runs the batch's halves, and their halves, until
every object has either its answer or has failed alone: a batch with one
culprit among ``n`` costs about ``2 log2 n`` more calls, and everyone else is
answered. The culprits' rows come back NaN (0 for integer outputs) with their
reason under :data:`ROW_ERRORS`. When every object fails alone, the failure is
the engine's, not the objects', unless a known-good call (``healthy``) still
succeeds: then the original error is raised for the whole batch (a server
error, not a client's).

Numpy only: the service's batcher and the pipeline's engines both use it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Key of the outputs that holds each row's error (None: answered) after a bisection; absent when none failed.
ROW_ERRORS = "row_errors"

Outputs = dict[str, np.ndarray]
#: A call over a range of the batch's rows: its row-aligned outputs.
RowsCall = Callable[[slice], Outputs]


@dataclass(frozen=True)
class Isolation:
    """What a bisection found: the rows that failed alone, the calls it took and the batch's first error."""

    failed_rows: tuple[int, ...]
    calls: int
    error: BaseException

    def describe(self) -> str:
        """The error for the log: its type and first line."""
        lines = str(self.error).strip().splitlines()
        return f"{type(self.error).__name__}: {lines[0][:300] if lines else ''}"


def isolate(call: RowsCall, n: int, healthy: Callable[[], Outputs] | None = None,
            stage: str = "the model") -> tuple[Outputs, Isolation | None]:
    """``call(slice(0, n))``, or when it raises, each row's outputs from the calls that succeed on parts of it.

    Returns the outputs (failed rows NaN, or 0 for integer arrays; their messages under :data:`ROW_ERRORS`) and
    the :class:`Isolation` (None when the first call succeeded). Raises the first call's error when every row
    fails alone and ``healthy`` (a call on an input known to be good, returning its outputs) fails too, or is
    not given: then the caller, not the data, is broken. ``stage`` names what failed in the rows' messages.
    """
    try:
        return call(slice(0, n)), None
    except Exception as exc:
        first = exc
    answered: list[tuple[slice, Outputs]] = []
    failed: list[int] = []
    calls = 1 + _bisect(call, 0, n, answered, failed)
    template = answered[0][1] if answered else _healthy_outputs(healthy)
    if template is None:
        raise first
    if not answered and healthy is not None:
        calls += 1
    isolation = Isolation(tuple(failed), calls, first)
    return _assemble(n, template, answered, failed, isolation, stage), isolation


def isolate_batch(infer: Callable[[np.ndarray, np.ndarray], Outputs], images: np.ndarray,
                  ebv: np.ndarray) -> tuple[Outputs, Isolation | None]:
    """:func:`isolate` for a model call ``infer(images, ebv)`` over a batch; the healthy probe is one blank
    cutout (zero flux, zero E(B-V): what the engines warm up with)."""
    def probe() -> Outputs:
        return infer(np.zeros((1, *images.shape[1:]), images.dtype), np.zeros(1, ebv.dtype))

    return isolate(lambda rows: infer(images[rows], ebv[rows]), len(images), probe)


def concatenate_outputs(parts: list[Outputs]) -> Outputs:
    """Row-aligned outputs of consecutive parts joined; a part without :data:`ROW_ERRORS` (none failed) counts
    as None for each of its rows when another part has them."""
    if len(parts) == 1:
        return parts[0]
    keys = [key for key in parts[0] if key != ROW_ERRORS]
    joined = {key: np.concatenate([part[key] for part in parts]) for key in keys}
    if any(ROW_ERRORS in part for part in parts):
        joined[ROW_ERRORS] = np.concatenate([part.get(ROW_ERRORS, np.full(len(part[keys[0]]), None, object))
                                             for part in parts])
    return joined


def _healthy_outputs(healthy: Callable[[], Outputs] | None) -> Outputs | None:
    try:
        return healthy() if healthy is not None else None
    except Exception:
        return None


def _bisect(call: RowsCall, lo: int, hi: int, answered: list[tuple[slice, Outputs]], failed: list[int]) -> int:
    """Rows [lo, hi) failed together: try each half (recursively); returns the calls made."""
    if hi - lo == 1:
        failed.append(lo)
        return 0
    calls = 0
    mid = (lo + hi) // 2
    for part in (slice(lo, mid), slice(mid, hi)):
        calls += 1
        try:
            answered.append((part, call(part)))
        except Exception:
            calls += _bisect(call, part.start, part.stop, answered, failed)
    return calls


def _assemble(n: int, template: Outputs, answered: list[tuple[slice, Outputs]], failed: list[int],
              isolation: Isolation, stage: str) -> Outputs:
    blank = {"f": np.nan, "c": np.nan, "O": None}
    outputs = {key: np.full((n, *value.shape[1:]), blank.get(value.dtype.kind, 0), value.dtype)
               for key, value in template.items()}
    for rows, part in answered:
        for key, value in part.items():
            outputs[key][rows] = value
    # errors found by an earlier stage (the model's, passed through the flags' stage) are kept
    errors = outputs.get(ROW_ERRORS, np.full(n, None, object))
    # the client learns the error's kind; its text (engine internals) goes to the log
    errors[failed] = (f"{stage} failed on this cutout alone ({type(isolation.error).__name__}; the server or "
                      "run log has the details); the other cutouts of its batch were answered")
    outputs[ROW_ERRORS] = errors
    return outputs
