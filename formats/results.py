"""Prediction results and their encodings, for the service and the pipeline alike.

One request's outcome is a :class:`Results` (PDFs and point estimates of the
valid objects, the problem of each invalid one). Every table output has one
row per input object, valid or not: :class:`ResultRows`. The encodings:

- JSON in qp's layout (service responses): valid objects only, the others
  listed in ``rejected``;
- FITS binary table (``PHOTOZ`` HDU, bin edges in ``BINS``): one row per object,
  ``VALID``/``ERROR`` columns;
- qp-readable HDF5 (a ``hist`` ensemble of the valid objects, rejected ids and
  errors as attributes);
- Parquet (pipeline tables), the bin edges in the schema metadata.

Ids are UTF-8 everywhere (FITS columns hold their UTF-8 bytes).
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from photoz.model.bundle import Bundle
from photoz.model.pdf import ESTIMATES, point_estimates
from photoz.model.quality import FLAG_BITS, flag_names, pdf_flag_bits

JSON_TYPE, FITS_TYPE, HDF5_TYPE = "application/json", "application/fits", "application/x-hdf5"
ACCEPTED = (JSON_TYPE, FITS_TYPE, HDF5_TYPE)
#: Output table formats by file suffix. qp.read takes ".hdf5" for h5py files (".h5" is pandas HDF5 to it).
TABLE_SUFFIXES = {".fits": "fits", ".fit": "fits", ".parquet": "parquet", ".hdf5": "hdf5"}


@dataclass
class ModelInfo:
    """Which model made the numbers: name, version and the bundle's sha256."""

    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, bundle: Bundle) -> ModelInfo:
        return cls(bundle.metadata.name, bundle.metadata.version, bundle.sha256)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass
class ResultRows:
    """One row per input object; invalid rows have NaN estimates and PDF, no flags and a non-empty error."""

    ids: list[str]
    valid: np.ndarray  # (n,) bool
    errors: list[str]
    estimates: dict[str, np.ndarray]  # each (n,) float64
    probs: np.ndarray  # (n, n_bins) float32
    flag_bits: np.ndarray  # (n,) uint32, photoz.model.quality.FLAG_BITS

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def flags(self) -> list[str]:
        """Comma-joined flag names per row ("" for none)."""
        return [",".join(names) for names in flag_names(self.flag_bits)]

    @classmethod
    def empty(cls, ids: list[str], problems: list[str | None], n_bins: int) -> ResultRows:
        """Rows with no prediction yet: fill ``probs`` and ``estimates`` of the valid rows with :meth:`fill`."""
        n = len(ids)
        return cls(list(ids), np.array([p is None for p in problems], bool), [p or "" for p in problems],
                   {key: np.full(n, np.nan) for key in ESTIMATES}, np.full((n, n_bins), np.nan, np.float32),
                   np.zeros(n, np.uint32))

    def fill(self, rows: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Put the engine's ``outputs`` (``probs``, the estimates and, if there, ``flag_bits``) into ``rows``."""
        self.probs[rows] = outputs["probs"]
        for key in ESTIMATES:
            self.estimates[key][rows] = outputs[key]
        self.flag_bits[rows] = outputs["flag_bits"] if "flag_bits" in outputs else pdf_flag_bits(outputs["probs"])

    def save(self, path: Path) -> None:
        """An ``.npz`` (no pickles), written atomically: the file exists only once complete."""
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays: dict[str, Any] = {"ids": _utf8(self.ids), "valid": self.valid, "errors": _utf8(self.errors),
                                  "probs": self.probs, "flag_bits": self.flag_bits, **self.estimates}
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ResultRows:
        with np.load(path, allow_pickle=False) as d:
            return cls(_from_utf8(d["ids"]), d["valid"], _from_utf8(d["errors"]),
                       {key: d[key] for key in ESTIMATES}, d["probs"], d["flag_bits"])

    @classmethod
    def concatenate(cls, parts: list[ResultRows]) -> ResultRows:
        return cls([i for p in parts for i in p.ids], np.concatenate([p.valid for p in parts]),
                   [e for p in parts for e in p.errors],
                   {key: np.concatenate([p.estimates[key] for p in parts]) for key in ESTIMATES},
                   np.concatenate([p.probs for p in parts]), np.concatenate([p.flag_bits for p in parts]))


@dataclass
class Results:
    """Per-object outcome of one request. ``probs``, ``estimates`` and ``flag_bits`` rows align with
    ``ids[valid]``; estimates and the PDF's own flag are computed here when not given."""

    bundle: Bundle
    ids: list[str]
    problems: list[str | None]
    probs: np.ndarray  # (n_valid, n_bins)
    estimates: dict[str, np.ndarray] = field(default_factory=dict)
    flag_bits: np.ndarray | None = None  # (n_valid,) uint32; None: the PDF's own flag, set here
    prior: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_PRIOR))  # photoz.model.priors: describe()

    def __post_init__(self) -> None:
        self.valid = np.array([p is None for p in self.problems], dtype=bool)
        if not self.estimates:
            self.estimates = point_estimates(self.probs, self.bundle.metadata.bins)
        if self.flag_bits is None:
            self.flag_bits = pdf_flag_bits(self.probs)
        self.flags = flag_names(self.flag_bits)

    def model_info(self) -> ModelInfo:
        return ModelInfo.of(self.bundle)

    def rows(self) -> ResultRows:
        """One row per input object."""
        table = ResultRows.empty(self.ids, self.problems, self.bundle.metadata.bins.n_bins)
        assert self.flag_bits is not None  # set by __post_init__
        table.fill(np.flatnonzero(self.valid), {"probs": self.probs, **self.estimates, "flag_bits": self.flag_bits})
        return table


#: What an answer says when no other prior was asked for: the PDFs as the network gives them.
TRAINING_PRIOR: dict[str, Any] = {"name": "train"}


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


_BIN_LISTS: dict[str, orjson.Fragment] = {}


def _bins_json(bundle: Bundle) -> orjson.Fragment:
    """The bin edges as JSON, written once per bundle (they are in every response: orjson copies the bytes)."""
    if bundle.sha256 not in _BIN_LISTS:
        _BIN_LISTS[bundle.sha256] = orjson.Fragment(orjson.dumps(np.round(bundle.metadata.bins.edges, 12).tolist()))
    return _BIN_LISTS[bundle.sha256]


_MODEL_JSON: dict[str, orjson.Fragment] = {}


def _model_json(bundle: Bundle) -> orjson.Fragment:
    """The ``model`` object of a bundle's answers, written once per bundle."""
    if bundle.sha256 not in _MODEL_JSON:
        _MODEL_JSON[bundle.sha256] = orjson.Fragment(orjson.dumps(ModelInfo.of(bundle).as_dict()))
    return _MODEL_JSON[bundle.sha256]


def to_json(results: Results, include_pdf: bool) -> bytes:
    """qp layout: pdf_name/pdf_version, meta.bins, data.pdfs, ancil columns; invalid objects in ``rejected``.

    ``qp.Ensemble(qp.hist, data=dict(bins=meta["bins"], pdfs=data["pdfs"]))``
    rebuilds the ensemble; ``ancil`` rows line up with ``data.pdfs`` rows.
    """
    every = all(p is None for p in results.problems)
    rejected = [] if every else np.flatnonzero(~results.valid).tolist()
    # one rounding call for all the estimates, as lists (orjson writes small lists faster than small arrays)
    estimates = np.array(list(results.estimates.values()), np.float64).round(6).tolist()
    doc: dict[str, Any] = {
        "model": _model_json(results.bundle),
        "prior": results.prior,
        "n_objects": len(results.ids),
        "pdf_name": "hist",
        "pdf_version": 0,
        "meta": {"bins": _bins_json(results.bundle)},
        "ancil": {"ids": results.ids if every else [results.ids[i] for i in np.flatnonzero(results.valid).tolist()],
                  **dict(zip(results.estimates, estimates, strict=True)), "flags": results.flags},
        "rejected": [{"index": i, "id": results.ids[i], "error": results.problems[i]} for i in rejected],
    }
    if include_pdf:
        doc["data"] = {"pdfs": results.probs.astype(np.float64).round(7)}
    # orjson writes the numpy arrays directly (shortest round-trip floats), ~10x faster than json + tolist
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _utf8(values: list[str]) -> np.ndarray:
    """Strings as UTF-8 bytes (FITS and HDF5 hold bytes; any id must survive the trip)."""
    return np.array([v.encode("utf-8") for v in values], dtype=bytes) if values else np.zeros(0, "S1")


def _from_utf8(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()]


def _text_column(name: str, values: list[str]) -> Any:
    from astropy.io import fits

    data = _utf8(values)
    return fits.Column(name=name, format=f"{max(1, data.dtype.itemsize)}A", array=data)


def fits_hdus(rows: ResultRows, edges: np.ndarray, model: ModelInfo, include_pdf: bool = True,
              prior: dict[str, Any] | None = None) -> Any:
    """HDUList: primary (model and prior keywords), ``PHOTOZ`` (one row per object), ``BINS`` (``Z_EDGES``;
    with ``N_Z``, the prior applied per bin, when it is not the training set's)."""
    from astropy.io import fits

    columns = [_text_column("ID", rows.ids), fits.Column(name="VALID", format="L", array=rows.valid)]
    columns += [fits.Column(name=key.upper(), format="D", array=rows.estimates[key]) for key in ESTIMATES]
    columns += [_text_column("FLAGS", rows.flags),
                fits.Column(name="FLAG_BITS", format="J", array=rows.flag_bits.astype(np.int32)),
                _text_column("ERROR", rows.errors)]
    if include_pdf:
        columns.append(fits.Column(name="PDF", format=f"{rows.probs.shape[1]}E", array=rows.probs))
    primary = fits.PrimaryHDU()
    primary.header["MODEL"], primary.header["MODELVER"] = model.name, model.version
    primary.header["SHA256"] = model.sha256[:68]
    for name, bit in FLAG_BITS.items():  # what FLAG_BITS means, in the file itself
        primary.header[f"FLAGBIT{bit.bit_length() - 1}"] = name
    prior = prior or TRAINING_PRIOR
    primary.header["PRIOR"] = (prior["name"], "redshift prior of the PDFs (train: as trained)")
    bins = fits.BinTableHDU.from_columns([fits.Column(name="Z_EDGES", format="D", array=edges)], name="BINS")
    hdus = [primary, fits.BinTableHDU.from_columns(columns, name="PHOTOZ"), bins]
    if "n_z" in prior:
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(name="N_Z", format="D", array=prior["n_z"])],
                                                  name="PRIOR"))
    return fits.HDUList(hdus)


def to_fits(results: Results, include_pdf: bool) -> bytes:
    """Binary table, one row per input object (invalid rows: VALID false, NaN estimates, ERROR set)."""
    buffer = io.BytesIO()
    fits_hdus(results.rows(), results.bundle.metadata.bins.edges, results.model_info(), include_pdf,
              results.prior).writeto(buffer)
    return buffer.getvalue()


class QpHdf5Writer:
    """qp's on-disk layout of a 'hist' ensemble (readable by ``qp.read``), written in appended blocks.

    Only valid rows enter the ensemble; rejected ids and errors go to the
    ``rejected_ids`` / ``rejected_errors`` attributes (JSON lists).
    """

    def __init__(self, h5: Any, edges: np.ndarray, model: ModelInfo, include_pdf: bool = True,
                 prior: dict[str, Any] | None = None) -> None:
        self.h5, self.include_pdf = h5, include_pdf
        self.rejected_ids: list[str] = []
        self.rejected_errors: list[str] = []
        meta = h5.create_group("meta")
        meta.create_dataset("pdf_name", data=np.array([b"hist"]))
        meta.create_dataset("pdf_version", data=np.array([0]))
        meta.create_dataset("bins", data=np.asarray(edges, np.float64)[None, :])
        h5.attrs.update({"model_name": model.name, "model_version": model.version, "model_sha256": model.sha256,
                         "flag_bits": json.dumps(FLAG_BITS), "prior": json.dumps(prior or TRAINING_PRIOR)})
        self.n_bins = len(edges) - 1 if include_pdf else 0
        self.pdfs = h5.create_group("data").create_dataset("pdfs", shape=(0, self.n_bins), maxshape=(None, self.n_bins),
                                                          dtype=np.float64, chunks=(4096, max(1, self.n_bins)))
        self.ancil = h5.create_group("ancil")

    def append(self, rows: ResultRows) -> int:
        """Add the valid rows; returns how many."""
        v = rows.valid
        ancil = {"ids": _utf8([i for i, ok in zip(rows.ids, v, strict=True) if ok]),
                 **{key: rows.estimates[key][v] for key in ESTIMATES},
                 "flags": _utf8([f for f, ok in zip(rows.flags, v, strict=True) if ok]), "flag_bits": rows.flag_bits[v]}
        _append(self.pdfs, rows.probs[v].astype(np.float64) if self.include_pdf else np.zeros((int(v.sum()), 0)))
        for key, value in ancil.items():
            if key not in self.ancil:
                self.ancil.create_dataset(key, shape=(0,), maxshape=(None,), dtype=value.dtype, chunks=(4096,))
            dataset = self.ancil[key]
            if value.dtype.kind == "S" and value.dtype.itemsize > dataset.dtype.itemsize:
                dataset = _widen(self.ancil, key, value.dtype)
            _append(dataset, value)
        self.rejected_ids += [i for i, ok in zip(rows.ids, v, strict=True) if not ok]
        self.rejected_errors += [e for e, ok in zip(rows.errors, v, strict=True) if not ok]
        return int(v.sum())

    def close(self) -> None:
        if self.rejected_ids:
            self.h5.attrs["rejected_ids"] = json.dumps(self.rejected_ids, ensure_ascii=False)
            self.h5.attrs["rejected_errors"] = json.dumps(self.rejected_errors, ensure_ascii=False)


def _append(dataset: Any, values: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


def _widen(group: Any, key: str, dtype: np.dtype) -> Any:
    """A fixed-width string data set re-made with a wider dtype (a later block has longer strings)."""
    old = group[key][...]
    del group[key]
    return group.create_dataset(key, data=old.astype(dtype), maxshape=(None,), chunks=(4096,))


def to_hdf5(results: Results, include_pdf: bool) -> bytes:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        writer = QpHdf5Writer(h5, results.bundle.metadata.bins.edges, results.model_info(), include_pdf,
                              results.prior)
        writer.append(results.rows())
        writer.close()
    return buffer.getvalue()


def parquet_table(rows: ResultRows, edges: np.ndarray, model: ModelInfo, prior: dict[str, Any] | None = None) -> Any:
    """A pyarrow Table, one row per object; the bin edges and model in the schema metadata."""
    import pyarrow as pa

    table = pa.table({"id": rows.ids, "valid": rows.valid, "error": rows.errors,
                      **{key: rows.estimates[key] for key in ESTIMATES}, "flags": rows.flags,
                      "flag_bits": rows.flag_bits,
                      "pdf": pa.FixedSizeListArray.from_arrays(pa.array(rows.probs.ravel()), rows.probs.shape[1])})
    meta = {b"photoz": json.dumps({"z_bin_edges": [float(e) for e in edges], "model": model.as_dict(),
                                   "flag_bits": FLAG_BITS, "prior": prior or TRAINING_PRIOR}).encode()}
    return table.replace_schema_metadata(meta)


def write_table(parts: list[ResultRows] | Any, out: Path, fmt: str, edges: np.ndarray, model: ModelInfo,
                prior: dict[str, Any] | None = None) -> int:
    """Write an iterable of row blocks as one table (FITS, Parquet or qp HDF5), atomically; returns the rows.
    ``prior``: the description of the prior the PDFs were re-weighted to (default: the training set's).

    Parquet and HDF5 stream block by block; FITS holds the table in memory.
    """
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = None
        for rows in parts:
            table = parquet_table(rows, edges, model, prior)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            n += len(rows)
        if writer is not None:
            writer.close()
    elif fmt == "hdf5":
        import h5py

        with h5py.File(tmp, "w") as h5:
            qp = QpHdf5Writer(h5, edges, model, prior=prior)
            n = sum(qp.append(rows) for rows in parts)
            qp.close()
    elif fmt == "fits":
        rows = ResultRows.concatenate(list(parts))
        fits_hdus(rows, edges, model, prior=prior).writeto(tmp, overwrite=True)
        n = len(rows)
    else:
        raise ValueError(f"unknown table format {fmt!r}: one of {', '.join(sorted(set(TABLE_SUFFIXES.values())))}")
    tmp.replace(out)
    return n


ENCODERS: dict[str, Callable[[Results, bool], bytes]] = {JSON_TYPE: to_json, FITS_TYPE: to_fits, HDF5_TYPE: to_hdf5}
