"""The pipeline's job objects (:mod:`photoz.jobs`): ``photoz predict``, ``cutouts`` and ``sdss-dataset``, their
options in one place each, from which the commands' flags are generated. Standard library only (the ``photoz``
command builds its parser from them without importing numpy)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photoz.jobs import option, positive_int, required


@dataclass
class PredictJob:
    """``photoz predict``: a model over files into one table (its flags are generated from these fields).

    ``inputs``: FITS, .npy, .npz or HDF5 files, or directories of them (searched recursively). ``out``: the table,
    ``.fits``, ``.parquet`` or ``.hdf5`` (qp-readable). ``model``: the bundle to run here (or on the Dask
    workers); ``url``, ``api_key``: a running photoz service instead. ``dask``: ``"local:N"`` (N single-threaded
    local worker processes) or a scheduler address, each worker loading the bundle once. ``prior``,
    ``prior_edges``, ``prior_weights`` (and the inputs' selection, ``selection_edges``,
    ``selection_completeness``): the redshift prior of the PDFs written (:mod:`photoz.model.priors`),
    applied when the table is written, so the parts stay the network's own PDFs and a re-run with another prior
    recomputes nothing.
    """

    inputs: list[str | Path] = required("files or directories", flag="inputs", nargs="+")
    out: str = required("output table: .fits, .parquet or .hdf5 (qp-readable)")
    model: str | None = option(None, "bundle (default: the shipped one)")
    url: str | None = option(None, "send the work to a running service instead")
    api_key: str | None = option(None, "the service's API key")
    providers: str = option("auto", "auto | tensorrt | cuda | cpu")
    chunk_size: int = option(4096, "objects per resumable chunk", parse=positive_int)
    batch_size: int = option(64, "cutouts per model call", parse=positive_int)
    dask: str | None = option(None, "run the chunks on Dask: local:N for N local worker processes, or a scheduler "
                                    "address", metavar="SCHEDULER")
    keep_parts: bool = option(False, "keep the per-chunk files and manifest in OUT.parts/")
    prior: str | None = option(None, "redshift prior of the PDFs: train (default: as trained), flat, self (the "
                                     "n(z) of all the inputs, by EM) or custom")
    prior_edges: Any = option(None, "custom prior: histogram bin edges in z (comma list)")
    prior_weights: Any = option(None, "custom prior: a weight per histogram bin (comma list)")
    selection_edges: Any = option(None, "the inputs' selection (with prior self or custom): completeness "
                                        "histogram bin edges in z (comma list)")
    selection_completeness: Any = option(None, "the inputs' selection: the fraction of their parent population "
                                               "kept, per bin (comma list)")
    selection: str | None = option(None, "the inputs' selection from a file that photoz completeness --out wrote "
                                         "(instead of the two flags above)")
    quiet: bool = option(False, "no progress bar")


def band_options(values: list[str] | None, what: str) -> dict[str, str]:
    """Repeated ``--WHAT BAND=VALUE`` flags as a dict (ValueError naming the flag for any other form)."""
    out = {}
    for value in values or []:
        band, sep, rest = value.partition("=")
        if not sep or not band or not rest:
            raise ValueError(f"--{what} takes BAND=VALUE, got {value!r}")
        out[band.strip()] = rest.strip()
    return out


def _units(values: list[str] | None) -> dict[str, str]:
    return band_options(values, "unit")


def _zero_points(values: list[str] | None) -> dict[str, float]:
    return {band: float(v) for band, v in band_options(values, "zero-point").items()}


@dataclass
class CutoutsJob:
    """``photoz cutouts``: bundle-sized cutouts from calibrated field images at a catalogue's positions, and
    optionally the photo-z table of them (``predict`` and the options after it)."""

    images: list[str] = required("one per band; the band comes from BAND= or the FITS FILTER/BAND header",
                                 flag="--image", append=True, metavar="[BAND=]PATH")
    catalogue: str = required("FITS, CSV or Parquet table with RA/Dec in degrees")
    out: str = required("output .npz (images, ebv, ids, ra, dec, x, y, near_edge)")
    model: str | None = option(None, "bundle whose bands, cutout size and pixel scale to use (default: the shipped "
                                     "one)")
    ra_col: str | None = option(None, "right ascension column (default: found by name)")
    dec_col: str | None = option(None, "declination column (default: found by name)")
    id_col: str | None = option(None, "object id column (default: found by name, else row numbers)")
    ebv_col: str | None = option(None, "Galactic E(B-V) column (0 when absent)")
    units: dict[str, str] = option(dict, "override a band's pixel unit (nanomaggy, maggy, Jy, uJy, nJy, ...)",
                                   flag="--unit", append=True, parse=_units, metavar="BAND=UNIT")
    zero_points: dict[str, float] = option(dict, "AB magnitude of one pixel unit of a band (for images in counts)",
                                           flag="--zero-point", append=True, parse=_zero_points, metavar="BAND=MAG")
    predict: str | None = option(None, "then run photoz predict on the cutouts into TABLE (.fits, .parquet or "
                                       ".hdf5)", metavar="TABLE")
    providers: str = option("auto", "with --predict: auto | tensorrt | cuda | cpu")
    url: str | None = option(None, "with --predict: send the cutouts to a running service instead")
    api_key: str | None = option(None, "the service's API key")
    quiet: bool = option(False, "no progress bar")


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"takes TRAIN,VALIDATION,TEST fractions, e.g. 0.8,0.1,0.1; got {value!r}")
    return parts  # type: ignore[return-value]


@dataclass
class SdssJob:
    """``photoz sdss-dataset``: a training file of real SDSS Main Galaxy Sample galaxies from the archive."""

    out: str = required("the training HDF5 to write")
    n: int | None = option(None, "the first N galaxies of the selection (by specObjID)", parse=positive_int)
    region: str | None = option(None, "a box on the sky, deg", metavar="RA_MIN,RA_MAX,DEC_MIN,DEC_MAX")
    skyserver: str | None = option(None, "SkyServer SqlSearch URL (default: SDSS DR17's)")
    sas: str | None = option(None, "base URL of the frames (default: the DR17 Science Archive Server)")
    cache: str | None = option(None, "keep downloaded frames here (default: deleted once used)")
    page_size: int = option(5000, "galaxies per selection query", parse=positive_int)
    chunk_size: int = option(2000, "galaxies per resumable chunk", parse=positive_int)
    concurrency: int = option(4, "downloads at once (be polite)", parse=positive_int)
    retries: int = option(5, "retries of a failed request (5xx, 429, network)")
    backoff_s: float = option(1.0, "seconds before the first retry (doubling after)", flag="--backoff")
    fractions: tuple[float, float, float] = option((0.8, 0.1, 0.1), "fractions of HEALPix pixels per split",
                                                   flag="--splits", parse=_fractions,
                                                   metavar="TRAIN,VALIDATION,TEST")
    nside: int = option(32, "HEALPix nside of the sky split (32: 3.4 deg^2)", parse=positive_int)
    seed: int = option(0, "seed of the split")
    quiet: bool = option(False, "no progress messages")


@dataclass
class CompletenessJob:
    """``photoz completeness``: the completeness C(z) of a sample's selection, measured on a labelled reference
    catalogue, for ``photoz predict --selection`` and requests' ``selection_edges``/``selection_completeness``."""

    catalogue: str = required("reference catalogue with redshifts: FITS, CSV, ECSV or Parquet table",
                              flag="catalogue")
    cuts: list[str] = required("the sample's cut on the catalogue's columns, COLUMN OP VALUE or COLUMN - COLUMN OP "
                               "VALUE (OP one of < <= > >=); repeat to combine (all must hold)",
                               flag="--cut", append=True, metavar="CUT")
    z_column: str = option("z", "the redshift column")
    edges: str = option("0:0.4:0.01", "the histogram's bins in z: START:STOP:STEP, or a comma list of edges")
    out: str | None = option(None, "write the selection here as JSON (photoz predict --selection FILE reads it)")
