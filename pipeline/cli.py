"""Pipeline-room subcommands: ``photoz predict``, ``photoz cutouts`` and ``photoz sdss-dataset``.

Imports only argparse at module level."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model_or_default(model: str | None) -> str | Path:
    """The bundle a command runs: the one named, else the shipped default."""
    if model:
        return model
    from photoz.model.bundle import default_bundle_path

    return default_bundle_path()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _fail(command: str, exc: BaseException) -> int:
    """A problem with the user's files or arguments: one line naming it, exit status 2 (no traceback)."""
    print(f"photoz {command}: {exc}", file=sys.stderr)
    return 2


def _predict(args: argparse.Namespace) -> int:
    from photoz.formats.errors import InputError
    from photoz.formats.inputs import parse_list_field
    from photoz.model.bundle import BundleError
    from photoz.pipeline.predict import InputFileError, predict_files

    model = args.model if args.url else _model_or_default(args.model)
    try:
        summary = predict_files(args.inputs, args.out, model=model, url=args.url, api_key=args.api_key,
                                providers=args.providers, chunk_size=args.chunk_size, batch_size=args.batch_size,
                                progress=not args.quiet, dask=args.dask, keep_parts=args.keep_parts,
                                prior=args.prior, prior_edges=parse_list_field(args.prior_edges, "prior_edges"),
                                prior_weights=parse_list_field(args.prior_weights, "prior_weights"))
    except (InputError, InputFileError, BundleError, FileNotFoundError, ValueError, RuntimeError) as exc:
        return _fail("predict", exc)
    print(f"{summary['out']}: {summary['written']} rows ({summary['objects']} objects) "
          f"by {summary['model']['name']} {summary['model']['version']}")
    return 0


def _cutouts(args: argparse.Namespace) -> int:
    from photoz.pipeline.cutouts import CutoutError, make_cutouts, parse_band_options

    args.model = _model_or_default(args.model)
    try:
        summary = make_cutouts(args.image, args.catalogue, args.out, model=args.model, ra_col=args.ra_col,
                               dec_col=args.dec_col, id_col=args.id_col, ebv_col=args.ebv_col,
                               units=parse_band_options(args.unit, "unit"),
                               zero_points={b: float(v) for b, v in parse_band_options(args.zero_point,
                                                                                      "zero-point").items()})
    except CutoutError as exc:
        return _fail("cutouts", exc)
    print(f"{summary['out']}: {summary['objects']} cutouts, {summary['near_edge']} too near an edge "
          f"(NaN beyond the field; predict reports them without a PDF)")
    if args.predict:
        from photoz.pipeline.predict import InputFileError, predict_files

        try:
            result = predict_files([summary["out"]], args.predict, model=None if args.url else args.model,
                                   url=args.url, api_key=args.api_key, providers=args.providers,
                                   progress=not args.quiet)
        except (InputFileError, FileNotFoundError, ValueError, RuntimeError) as exc:
            return _fail("cutouts --predict", exc)
        print(f"{result['out']}: {result['written']} rows by {result['model']['name']} {result['model']['version']}")
    return 0


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"takes TRAIN,VALIDATION,TEST fractions, e.g. 0.8,0.1,0.1; got {value!r}")
    return parts  # type: ignore[return-value]


def _sdss_dataset(args: argparse.Namespace) -> int:
    from photoz.pipeline.cutouts import CutoutError
    from photoz.pipeline.sdss import SAS_URL, SKYSERVER_URL, Region, SDSSArchiveError, build

    try:
        region = Region.parse(args.region) if args.region else None
        summary = build(args.out, n=args.n, region=region, skyserver=args.skyserver or SKYSERVER_URL,
                        sas=args.sas or SAS_URL, cache=args.cache, page_size=args.page_size,
                        chunk_size=args.chunk_size, concurrency=args.concurrency, fractions=args.splits,
                        nside=args.nside, seed=args.seed, retries=args.retries, backoff_s=args.backoff,
                        log=(lambda _m: None) if args.quiet else print)
    except (SDSSArchiveError, CutoutError, ValueError, OSError) as exc:
        return _fail("sdss-dataset", exc)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    print(f"{summary['out']}: {summary['objects']} galaxies ({splits}) from {summary['fields']} fields; "
          f"{summary['skipped']} skipped (listed in skipped/)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("predict", help="run a bundle offline over files or directories into one table",
                       description="Photo-z for every cutout in FITS/.npy/.npz files, directories of them, or HDF5 "
                                   "data sets. Resumable: finished chunks are kept in OUT.parts/ until the end.")
    p.add_argument("inputs", nargs="+", help="files or directories")
    p.add_argument("--out", required=True, help="output table: .fits, .parquet or .hdf5 (qp-readable)")
    p.add_argument("--model", default=None, help="bundle (default: the shipped one)")
    p.add_argument("--url", default=None, help="send the work to a running service instead")
    p.add_argument("--api-key", default=None)
    p.add_argument("--providers", default="auto", help="auto | tensorrt | cuda | cpu")
    p.add_argument("--chunk-size", type=_positive_int, default=4096, help="objects per resumable chunk")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="cutouts per model call")
    p.add_argument("--dask", default=None, metavar="SCHEDULER",
                   help="run the chunks on Dask: local:N for N local worker processes, or a scheduler address")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-chunk files and manifest in OUT.parts/")
    p.add_argument("--prior", default=None, help="redshift prior of the PDFs: train (default: as trained), flat, "
                                                 "self (the n(z) of all the inputs, by EM) or custom")
    p.add_argument("--prior-edges", default=None, help="custom prior: histogram bin edges in z (comma list)")
    p.add_argument("--prior-weights", default=None, help="custom prior: a weight per histogram bin (comma list)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_predict)

    p = sub.add_parser("cutouts", help="cut bundle-sized cutouts from calibrated field images at catalogue positions",
                       description="One calibrated FITS image per band (WCS; pixels in nanomaggies, a flux density "
                                   "BUNIT, or counts with NMGY or a zero point) and a catalogue of RA/Dec (FITS, CSV "
                                   "or Parquet) -> an .npz of cutouts aligned to the r-band WCS, ready for "
                                   "`photoz predict` (or straight to a photo-z table with --predict).")
    p.add_argument("--image", action="append", required=True, metavar="[BAND=]PATH",
                   help="one per band; the band comes from BAND= or the FITS FILTER/BAND header")
    p.add_argument("--catalogue", required=True, help="FITS, CSV or Parquet table with RA/Dec in degrees")
    p.add_argument("--out", required=True, help="output .npz (images, ebv, ids, ra, dec, x, y, near_edge)")
    p.add_argument("--model", default=None, help="bundle whose bands, cutout size and pixel scale to use "
                                                 "(default: the shipped one)")
    p.add_argument("--ra-col", default=None)
    p.add_argument("--dec-col", default=None)
    p.add_argument("--id-col", default=None)
    p.add_argument("--ebv-col", default=None, help="Galactic E(B-V) column (0 when absent)")
    p.add_argument("--unit", action="append", metavar="BAND=UNIT",
                   help="override a band's pixel unit (nanomaggy, maggy, Jy, uJy, nJy, ...)")
    p.add_argument("--zero-point", action="append", metavar="BAND=MAG",
                   help="AB magnitude of one pixel unit of a band (for images in counts)")
    p.add_argument("--predict", default=None, metavar="TABLE",
                   help="then run photoz predict on the cutouts into TABLE (.fits, .parquet or .hdf5)")
    p.add_argument("--providers", default="auto", help="with --predict: auto | tensorrt | cuda | cpu")
    p.add_argument("--url", default=None, help="with --predict: send the cutouts to a running service instead")
    p.add_argument("--api-key", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cutouts)

    p = sub.add_parser("sdss-dataset", help="build a training file of real SDSS galaxies from the archive",
                       description="Main Galaxy Sample galaxies with spectroscopic redshifts from SkyServer, their "
                                   "calibrated frames from the Science Archive Server, cutouts registered as "
                                   "`photoz cutouts` does, sky-position splits -> the HDF5 `photoz train` reads. "
                                   "Resumable: work is kept in OUT.parts/ until the file is written.")
    p.add_argument("--out", required=True, help="the training HDF5 to write")
    p.add_argument("--n", type=_positive_int, default=None, help="the first N galaxies of the selection "
                                                                 "(by specObjID)")
    p.add_argument("--region", default=None, metavar="RA_MIN,RA_MAX,DEC_MIN,DEC_MAX", help="a box on the sky, deg")
    p.add_argument("--skyserver", default=None, help="SkyServer SqlSearch URL (default: SDSS DR17's)")
    p.add_argument("--sas", default=None, help="base URL of the frames (default: the DR17 Science Archive Server)")
    p.add_argument("--cache", default=None, help="keep downloaded frames here (default: deleted once used)")
    p.add_argument("--page-size", type=_positive_int, default=5000, help="galaxies per selection query")
    p.add_argument("--chunk-size", type=_positive_int, default=2000, help="galaxies per resumable chunk")
    p.add_argument("--concurrency", type=_positive_int, default=4, help="downloads at once (be polite)")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed request (5xx, 429, network)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling after)")
    p.add_argument("--splits", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VALIDATION,TEST",
                   help="fractions of HEALPix pixels per split")
    p.add_argument("--nside", type=_positive_int, default=32, help="HEALPix nside of the sky split (32: 3.4 deg^2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_sdss_dataset)
