"""``photoz completeness``: a selection's completeness C(z) measured on a labelled reference catalogue.

A sample cut on its photometry (a magnitude limit, a colour cut) declares the cut with its prior
(:mod:`photoz.model.priors`, docs/priors.md): the fraction of its parent population the cut keeps at each
redshift. This measures it on any catalogue with redshifts and the cut's columns (a spectroscopic sample, say):
the rows whose redshift and cut columns are all finite, counted per bin with half an object
(:func:`photoz.model.priors.completeness_histogram`).
"""
from __future__ import annotations

import json
import operator
import re
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.priors import completeness_histogram
from photoz.pipeline.cutouts import read_table
from photoz.pipeline.jobs import CompletenessJob

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CUT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:-\s*([A-Za-z_][\w.]*)\s*)?(<=|>=|<|>)\s*(\S+)\s*$")


def parse_cut(text: str) -> tuple[str, str | None, str, float]:
    """``COLUMN OP VALUE`` or ``COLUMN - COLUMN OP VALUE`` as (column, subtracted column or None, op, value)."""
    match = _CUT.match(text)
    value = None
    if match:
        try:
            value = float(match.group(4))
        except ValueError:
            value = None
    if match is None or value is None or not np.isfinite(value):
        raise ValueError(f"--cut {text!r}: expected COLUMN OP VALUE or COLUMN - COLUMN OP VALUE, OP one of "
                         f"{' '.join(OPERATORS)}, VALUE a finite number (e.g. 'petroMag_r < 17', "
                         "'u - r >= 2.22')")
    return match.group(1), match.group(2), match.group(3), value


def parse_edges(text: str) -> np.ndarray:
    """``START:STOP:STEP`` (STOP included when the steps reach it) or a comma list of increasing edges."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop <= start:
                raise ValueError
            edges = start + step * np.arange(int(round((stop - start) / step)) + 1)
        else:
            edges = np.asarray([float(v) for v in text.split(",")])
    except ValueError:
        edges = np.zeros(0)
    if edges.size < 2 or not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        raise ValueError(f"--edges {text!r}: expected START:STOP:STEP with STOP > START and STEP > 0, or at least "
                         "2 strictly increasing comma-separated redshifts")
    return edges


def measure(job: CompletenessJob) -> dict[str, Any]:
    """The selection as a request sends it (``selection_edges``, ``selection_completeness``), with how it was
    measured: the catalogue, the cuts, the rows used and kept. Writes it to ``job.out`` as JSON if given."""
    table = read_table(job.catalogue)
    cuts = [parse_cut(c) for c in job.cuts]
    edges = parse_edges(job.edges)

    def column(name: str) -> np.ndarray:
        if name not in table.colnames:
            raise ValueError(f"{job.catalogue}: no column {name!r}; columns are {table.colnames}")
        data = table[name]
        filled = data.filled(np.nan) if hasattr(data, "filled") else data
        try:
            return np.asarray(filled, np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{job.catalogue}: column {name!r} is not numeric") from None

    z = column(job.z_column)
    usable = np.isfinite(z)
    selected = np.ones(len(z), bool)
    for name, minus, op, value in cuts:
        quantity = column(name) - (column(minus) if minus else 0.0)
        usable &= np.isfinite(quantity)
        selected &= OPERATORS[op](np.where(np.isfinite(quantity), quantity, 0.0), value)
    z, selected = z[usable], selected[usable]
    in_range = (z >= edges[0]) & (z < edges[-1])
    if not in_range.any():
        raise ValueError(f"{job.catalogue}: no usable row has {job.z_column} within {edges[0]:g}-{edges[-1]:g}")
    result = {"selection_edges": [round(float(e), 10) for e in edges],
              "selection_completeness": [round(float(c), 8) for c in completeness_histogram(z, selected, edges)],
              "catalogue": str(job.catalogue), "cuts": list(job.cuts), "z_column": job.z_column,
              "n_reference": int(in_range.sum()), "n_selected": int((selected & in_range).sum()),
              "n_unusable": int((~usable).sum()),
              "empty_bins": int((np.histogram(z, edges)[0] == 0).sum())}  # C = 1/2 there: unknown
    if job.out:
        Path(job.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def read_selection(path: str | Path) -> tuple[list[float], list[float]]:
    """``selection_edges`` and ``selection_completeness`` from a file :func:`measure` wrote."""
    try:
        document = json.loads(Path(path).read_text())
        return document["selection_edges"], document["selection_completeness"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--selection {path}: expected the JSON that photoz completeness --out writes "
                         f"(selection_edges, selection_completeness): {exc}") from None
