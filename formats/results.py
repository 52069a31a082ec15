"""Prediction results and their encodings: JSON (qp layout), FITS table, qp-readable HDF5."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import orjson

from photoz.model.bundle import Bundle
from photoz.model.pdf import point_estimates

ESTIMATES = ("z_mean", "z_median", "z_mode", "z_std", "z_lo68", "z_hi68", "z_lo95", "z_hi95")
#: A PDF with at least this much probability in the top EDGE_BINS bins may lie beyond the grid.
EDGE_PROBABILITY, EDGE_BINS = 0.1, 5

JSON_TYPE, FITS_TYPE, HDF5_TYPE = "application/json", "application/fits", "application/x-hdf5"
ACCEPTED = (JSON_TYPE, FITS_TYPE, HDF5_TYPE)


@dataclass
class Results:
    """Per-object outcome of one request. ``probs`` rows align with ``ids[valid]``."""

    bundle: Bundle
    ids: list[str]
    problems: list[str | None]
    probs: np.ndarray  # (n_valid, n_bins)
    estimates: dict[str, np.ndarray] | None = None  # computed here when not given

    def __post_init__(self):
        self.valid = np.array([p is None for p in self.problems], dtype=bool)
        if self.estimates is None:
            self.estimates = point_estimates(self.probs, self.bundle.metadata.bins)
        at_edge = self.probs[:, -EDGE_BINS:].sum(axis=1) >= EDGE_PROBABILITY if len(self.probs) else np.zeros(0, bool)
        self.flags = [["pdf_at_grid_edge"] if e else [] for e in at_edge]

    def model_info(self) -> dict:
        md = self.bundle.metadata
        return {"name": md.name, "version": md.version, "sha256": self.bundle.sha256}


def choose_media_type(accept: str | None) -> str | None:
    """The response type for an Accept header; None if nothing acceptable."""
    if not accept:
        return JSON_TYPE
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", JSON_TYPE):
            return JSON_TYPE
        if media in (FITS_TYPE, "image/fits"):
            return FITS_TYPE
        if media in (HDF5_TYPE, "application/x-hdf", "application/hdf5"):
            return HDF5_TYPE
    return None


_BIN_LISTS: dict[str, list[float]] = {}


def _bins_json(bundle: Bundle) -> list[float]:
    """The bin edges as a JSON-ready list, made once per bundle (they are in every response)."""
    if bundle.sha256 not in _BIN_LISTS:
        _BIN_LISTS[bundle.sha256] = np.round(bundle.metadata.bins.edges, 12).tolist()
    return _BIN_LISTS[bundle.sha256]


def to_json(results: Results, include_pdf: bool) -> bytes:
    """qp layout: pdf_name/pdf_version, meta.bins, data.pdfs, ancil columns; invalid objects in ``rejected``.

    ``qp.Ensemble(qp.hist, data=dict(bins=meta["bins"], pdfs=data["pdfs"]))``
    rebuilds the ensemble; ``ancil`` rows line up with ``data.pdfs`` rows.
    """
    ids = np.asarray(results.ids, dtype=object)
    estimates = np.round(np.array(list(results.estimates.values()), np.float64), 6)  # one call, not eight
    doc = {
        "model": results.model_info(),
        "n_objects": len(results.ids),
        "pdf_name": "hist",
        "pdf_version": 0,
        "meta": {"bins": _bins_json(results.bundle)},
        "ancil": {"ids": ids[results.valid].tolist(), **dict(zip(results.estimates, estimates)),
                  "flags": results.flags},
        "rejected": [{"index": int(i), "id": results.ids[i], "error": results.problems[i]}
                     for i in np.flatnonzero(~results.valid)],
    }
    if include_pdf:
        doc["data"] = {"pdfs": np.round(results.probs.astype(np.float64), 7)}
    # orjson writes the numpy arrays directly (shortest round-trip floats), ~10x faster than json + tolist
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def to_fits(results: Results, include_pdf: bool) -> bytes:
    """Binary table, one row per input object (invalid rows: VALID false, NaN estimates, ERROR set)."""
    from astropy.io import fits

    n, n_bins = len(results.ids), results.bundle.metadata.bins.n_bins
    columns = [fits.Column(name="ID", format=f"{max(1, max(len(i) for i in results.ids))}A", array=results.ids),
               fits.Column(name="VALID", format="L", array=results.valid)]
    for key in ESTIMATES:
        full = np.full(n, np.nan)
        full[results.valid] = results.estimates[key]
        columns.append(fits.Column(name=key.upper(), format="D", array=full))
    flags = [""] * n
    for i, f in zip(np.flatnonzero(results.valid), results.flags):
        flags[i] = ",".join(f)
    errors = [p or "" for p in results.problems]
    columns.append(fits.Column(name="FLAGS", format=f"{max(1, max(map(len, flags)))}A", array=flags))
    columns.append(fits.Column(name="ERROR", format=f"{max(1, max(map(len, errors)))}A", array=errors))
    if include_pdf:
        pdf = np.full((n, n_bins), np.nan, np.float32)
        pdf[results.valid] = results.probs
        columns.append(fits.Column(name="PDF", format=f"{n_bins}E", array=pdf))
    table = fits.BinTableHDU.from_columns(columns, name="PHOTOZ")
    info = results.model_info()
    primary = fits.PrimaryHDU()
    primary.header["MODEL"], primary.header["MODELVER"] = info["name"], info["version"]
    primary.header["SHA256"] = info["sha256"][:68]
    bins = fits.BinTableHDU.from_columns([fits.Column(name="Z_EDGES", format="D",
                                                      array=results.bundle.metadata.bins.edges)], name="BINS")
    buffer = io.BytesIO()
    fits.HDUList([primary, table, bins]).writeto(buffer)
    return buffer.getvalue()


def write_qp_hdf5(h5, edges: np.ndarray, probs: np.ndarray, ancil: dict) -> None:
    """qp's on-disk layout of a 'hist' ensemble (readable by ``qp.read``)."""
    meta = h5.create_group("meta")
    meta.create_dataset("pdf_name", data=np.array([b"hist"]))
    meta.create_dataset("pdf_version", data=np.array([0]))
    meta.create_dataset("bins", data=np.asarray(edges, np.float64)[None, :])
    h5.create_group("data").create_dataset("pdfs", data=np.asarray(probs, np.float64))
    group = h5.create_group("ancil")
    for key, value in ancil.items():
        group.create_dataset(key, data=value)


def to_hdf5(results: Results, include_pdf: bool) -> bytes:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        ids = np.asarray(results.ids)[results.valid].astype("S")
        ancil = {"ids": ids, **results.estimates,
                 "flags": np.array([",".join(f) for f in results.flags], dtype="S")}
        probs = results.probs if include_pdf else np.zeros((len(ids), 0))
        write_qp_hdf5(h5, results.bundle.metadata.bins.edges, probs, ancil)
        info = results.model_info()
        h5.attrs.update({"model_name": info["name"], "model_version": info["version"], "model_sha256": info["sha256"]})
        if (~results.valid).any():
            h5.attrs["rejected_ids"] = json.dumps([results.ids[i] for i in np.flatnonzero(~results.valid)])
            h5.attrs["rejected_errors"] = json.dumps([p for p in results.problems if p])
    return buffer.getvalue()


ENCODERS = {JSON_TYPE: to_json, FITS_TYPE: to_fits, HDF5_TYPE: to_hdf5}
