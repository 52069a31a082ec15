"""Pipeline-room subcommands: ``photoz predict``, ``cutouts``, ``sdss-dataset`` and ``completeness``.

Imports only the standard library at module level (argparse, and the job objects of :mod:`photoz.jobs` and
:mod:`photoz.pipeline.jobs`, which need nothing else)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from photoz import jobs


def _model_or_default(model: str | None) -> str | Path:
    """The bundle a command runs: the one named, else the shipped default."""
    if model:
        return model
    from photoz.model.bundle import default_bundle_path

    return default_bundle_path()


def _fail(command: str, exc: BaseException) -> int:
    """A problem with the user's files or arguments: one line naming it, exit status 2 (no traceback)."""
    print(f"photoz {command}: {exc}", file=sys.stderr)
    return 2


def _predict(args: argparse.Namespace) -> int:
    from photoz.formats.errors import InputError
    from photoz.model.bundle import BundleError
    from photoz.pipeline.jobs import PredictJob
    from photoz.pipeline.predict import InputFileError, predict_files

    job = jobs.from_arguments(args, PredictJob)
    job.model = job.model if job.url else str(_model_or_default(job.model))
    try:
        summary = predict_files(job)
    except (InputError, InputFileError, BundleError, FileNotFoundError, ValueError, RuntimeError) as exc:
        return _fail("predict", exc)
    print(f"{summary['out']}: {summary['written']} rows ({summary['objects']} objects) "
          f"by {summary['model']['name']} {summary['model']['version']}")
    return 0


def _cutouts(args: argparse.Namespace) -> int:
    from photoz.pipeline.cutouts import CutoutError, make_cutouts
    from photoz.pipeline.jobs import CutoutsJob

    try:
        job = jobs.from_arguments(args, CutoutsJob)
        job.model = str(_model_or_default(job.model))
        summary = make_cutouts(job)
    except (CutoutError, ValueError) as exc:
        return _fail("cutouts", exc)
    print(f"{summary['out']}: {summary['objects']} cutouts, {summary['near_edge']} too near an edge "
          f"(NaN beyond the field; predict reports them without a PDF)")
    if job.predict:
        from photoz.pipeline.jobs import PredictJob
        from photoz.pipeline.predict import InputFileError, predict_files

        try:
            result = predict_files(PredictJob([summary["out"]], job.predict, model=None if job.url else job.model,
                                              url=job.url, api_key=job.api_key, providers=job.providers,
                                              quiet=job.quiet))
        except (InputFileError, FileNotFoundError, ValueError, RuntimeError) as exc:
            return _fail("cutouts --predict", exc)
        print(f"{result['out']}: {result['written']} rows by {result['model']['name']} {result['model']['version']}")
    return 0


def _sdss_dataset(args: argparse.Namespace) -> int:
    from photoz.pipeline.cutouts import CutoutError
    from photoz.pipeline.jobs import SdssJob
    from photoz.pipeline.sdss import SDSSArchiveError, build

    job = jobs.from_arguments(args, SdssJob)
    try:
        summary = build(job, log=(lambda _m: None) if job.quiet else print)
    except (SDSSArchiveError, CutoutError, ValueError, OSError) as exc:
        return _fail("sdss-dataset", exc)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"{summary['out']}: {summary['objects']} galaxies ({splits}) from {summary['fields']} fields; "
          f"{summary['skipped']} skipped (listed in skipped/)")
    return 0


def _completeness(args: argparse.Namespace) -> int:
    from photoz.pipeline.completeness import measure
    from photoz.pipeline.jobs import CompletenessJob

    job = jobs.from_arguments(args, CompletenessJob)
    try:
        result = measure(job)
    except ValueError as exc:  # CutoutError (an unreadable catalogue) included
        return _fail("completeness", exc)
    print(f"C(z) of {' and '.join(job.cuts)}: {result['n_selected']} of {result['n_reference']} reference objects "
          f"kept ({result['n_unusable']} without a finite value, left out)"
          + (f"; {result['empty_bins']} bins hold no reference object (their C is 1/2: unknown)"
             if result["empty_bins"] else "")
          + (f"; written to {job.out}" if job.out else ""), file=sys.stderr)
    print("--selection-edges " + ",".join(f"{v:g}" for v in result["selection_edges"])
          + " --selection-completeness " + ",".join(f"{v:.6g}" for v in result["selection_completeness"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from photoz.pipeline.jobs import CompletenessJob, CutoutsJob, PredictJob, SdssJob

    jobs.add_command(sub, "predict", PredictJob, _predict,
                     help="run a bundle offline over files or directories into one table",
                     description="Photo-z for every cutout in FITS/.npy/.npz files, directories of them, or HDF5 "
                                 "data sets. Resumable: finished chunks are kept in OUT.parts/ until the end.")

    jobs.add_command(sub, "cutouts", CutoutsJob, _cutouts,
                     help="cut bundle-sized cutouts from calibrated field images at catalogue positions",
                     description="One calibrated FITS image per band (WCS; pixels in nanomaggies, a flux density "
                                 "BUNIT, or counts with NMGY or a zero point) and a catalogue of RA/Dec (FITS, CSV "
                                 "or Parquet) -> an .npz of cutouts aligned to the r-band WCS, ready for "
                                 "`photoz predict` (or straight to a photo-z table with --predict).")

    jobs.add_command(sub, "sdss-dataset", SdssJob, _sdss_dataset,
                     help="build a training file of real SDSS galaxies from the archive",
                     description="Main Galaxy Sample galaxies with spectroscopic redshifts from SkyServer, their "
                                 "calibrated frames from the Science Archive Server, cutouts registered as "
                                 "`photoz cutouts` does, sky-position splits -> the HDF5 `photoz train` reads. "
                                 "Resumable: work is kept in OUT.parts/ until the file is written.")

    jobs.add_command(sub, "completeness", CompletenessJob, _completeness,
                     help="measure a sample's selection, C(z), on a reference catalogue with redshifts",
                     description="The fraction of a reference catalogue's objects at each redshift that the "
                                 "sample's cut keeps: what photoz predict --selection (and a request's "
                                 "selection_edges, selection_completeness) takes with prior self or custom, so "
                                 "that a sample cut on its photometry is not counted twice (docs/priors.md). "
                                 "Prints the two flags; --out writes JSON.")
