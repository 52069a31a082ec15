"""Training-room subcommands: simulate, train, evaluate, export, ship and the release's tools.

Only the standard library is imported here (argparse, and the job objects of :mod:`photoz.jobs`, which need
nothing else); each handler imports what it needs, so the ``photoz`` command starts fast and serving-only
installs never touch torch.
"""
from __future__ import annotations

import argparse
import logging

from photoz import jobs


def _simulate(args) -> int:
    from photoz.training.simulation.simulate import simulate

    path = simulate(args.out, args.n, seed=args.seed, workers=args.workers, chunk_size=args.chunk_size,
                    progress=not args.quiet)
    print(f"{path}: {args.n} galaxies")
    return 0


def _simulate_field(args) -> int:
    from photoz.training.simulation.field import render_field

    summary = render_field(args.out, n=args.n, seed=args.seed, n_edge=args.n_edge)
    print(f"{summary['out']}: {summary['n']} galaxies on a {summary['shape'][1]} x {summary['shape'][0]} pixel field, "
          f"frame-[ugriz].fits ({', '.join(f'{b}: {u}' for b, u in summary['units'].items())}), catalogue.csv, "
          "truth.npz")
    return 0


def _train(args) -> int:
    from photoz.training.fit.config import from_arguments
    from photoz.training.fit.train import train

    out = train(from_arguments(args), resume=args.resume, progress=not args.quiet)
    print(f"checkpoints and metrics in {out}")
    return 0


def _evaluate(args) -> int:
    from photoz.training.evaluation.evaluate import evaluate, format_report

    report = evaluate(args.model, args.data, args.out, baseline_train=args.baseline_train,
                      figures=not args.no_figures, split=args.split)
    print(format_report(report))
    print(f"\nmetrics and figures in {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from photoz.training.release.export import export_checkpoint
    from photoz.training.release.jobs import ExportJob

    bundle = export_checkpoint(jobs.from_arguments(args, ExportJob))
    print(f"{bundle.path}  sha256 {bundle.sha256}  (ONNX/torch parity checked)")
    return 0


def _ship(args: argparse.Namespace) -> int:
    from photoz.training.release.jobs import ShipJob
    from photoz.training.release.ship import ship

    logging.basicConfig(level="INFO", format="%(message)s")
    result = ship(jobs.from_arguments(args, ShipJob))
    print(f"{result['bundle'].path}  sha256 {result['bundle'].sha256}; card {result['card']}; flags' injection "
          f"targets {'met' if result['ood_targets_met'] else 'NOT met (see the card)'}")
    return 0


def _guard_graph(args) -> int:
    from photoz.model.network.export import guard_bundle

    bundle, guarded = guard_bundle(args.model, args.out, args.version)
    print(f"{guarded} index cast(s) guarded; {bundle.path}  sha256 {bundle.sha256}")
    return 0


def _record_prior(args) -> int:
    from photoz.model.bundle import load_bundle
    from photoz.model.network.export import revised, write_metadata
    from photoz.training.release.export import training_nz_record

    bundle = load_bundle(args.model)
    record = training_nz_record(args.data, bundle.metadata.bins, args.n, args.source)
    document = dict(bundle.metadata.document)
    document["training"] = {**document["training"], "n_z": record}
    if args.version:
        document = revised(document, args.version, f"training set's n(z) recorded ({record['source']}): requests "
                                                   "may ask for another prior; same graph, identical outputs")
    written = write_metadata(args.model, document, args.out)
    print(f"n(z) of {record['n_objects']:,} objects ({record['outside_grid']} outside the grid) recorded")
    print(f"{written.path}  sha256 {written.sha256}")
    return 0


def _ood_thresholds(args) -> int:
    from photoz.model.bundle import load_bundle
    from photoz.model.network.export import write_metadata
    from photoz.training.release.flags import reference_quality

    bundle = load_bundle(args.model)
    document = {**bundle.metadata.document, "quality": reference_quality(args.data, args.n)}
    if args.version:
        document["model"] = {**document["model"], "version": args.version}
    written = write_metadata(args.model, document, args.out)
    thresholds = document["quality"]["thresholds"]
    print(", ".join(f"{k} {v:.4g}" for k, v in thresholds.items() if isinstance(v, float)))
    print(f"{written.path}  sha256 {written.sha256}")
    return 0


def _calibrate_pit(args) -> int:
    from photoz.training.release.pit_calibration import run

    return run(args)


def _recalibrate(args) -> int:
    from photoz.training.release.temperature import main

    return main(["--checkpoint", args.checkpoint, "--out", args.out] + (["--data", args.data] if args.data else []))


def register(sub: argparse._SubParsersAction) -> None:
    """The training room's subcommands, by stage: simulation, fitting, evaluation, release."""
    _register_simulation(sub)
    _register_fit(sub)
    _register_evaluation(sub)
    _register_release(sub)
    _register_bundle_revisions(sub)
    _register_calibration(sub)


def _register_simulation(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate SDSS-like galaxy cutouts to an HDF5 data set",
                       description="Simulate SDSS Main Galaxy Sample cutouts with GalSim. Deterministic for a "
                                   "seed; re-running with a larger --n extends the file, an interrupted run "
                                   "resumes where it stopped.")
    p.add_argument("--n", type=int, required=True, help="number of galaxies in the data set")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=256, help="galaxies per deterministic chunk (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("simulate-field", help="simulate field images (one FITS per band) and a catalogue",
                       description="Galaxies of the simulated population at known sky positions on one calibrated "
                                   "FITS image per band (each with its own WCS and unit convention), a catalogue "
                                   "and the truth: the test bed of `photoz cutouts`.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=36, help="number of galaxies")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--n-edge", type=int, default=2, help="how many of them sit too near an edge")
    p.set_defaults(func=_simulate_field)


def _register_fit(sub: argparse._SubParsersAction) -> None:
    from photoz.training.fit.config import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="train a network variant on a labelled HDF5 data set",
                       description="Train with cross-entropy over redshift bins. Use torchrun for DDP.")
    add_train_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)


def _register_evaluation(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a bundle or checkpoint on a labelled data set")
    p.add_argument("--model", required=True, help="bundle (.onnx) or checkpoint (.pt)")
    p.add_argument("--data", required=True, help="labelled HDF5 data set")
    p.add_argument("--out", required=True, help="directory for metrics.json and figures")
    p.add_argument("--baseline-train", default=None,
                   help="HDF5 data set with a catalogue to fit the kNN baseline on (scored side by side)")
    p.add_argument("--split", default=None, choices=("train", "validation", "test"),
                   help="score only these rows of a file with a split dataset (photoz sdss-dataset writes one); "
                        "the baseline then fits on the train rows of --baseline-train")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=_evaluate)


def _register_release(sub: argparse._SubParsersAction) -> None:
    from photoz.training.release.jobs import ExportJob, ShipJob

    jobs.add_command(sub, "export", ExportJob, _export,
                     help="export a training checkpoint (or a deep ensemble of them) to an ONNX bundle")
    jobs.add_command(sub, "ship", ShipJob, _ship,
                     help="release a trained run as the shipped bundle: export, score, thresholds, card",
                     description="What `make ship` runs: export a candidate without thresholds, score that very "
                                 "graph on the held-out set with the catalogue baselines, export the bundle with "
                                 "the score and its flags' thresholds (measured on the training set), run the "
                                 "flags' injection report, write the model card beside the bundle.")


def _register_bundle_revisions(sub: argparse._SubParsersAction) -> None:
    """Commands that revise an exported bundle's metadata or graph in place (older bundles)."""
    p = sub.add_parser("guard-graph", help="make an exported bundle's graph safe on non-finite values (what "
                                           "photoz export now does itself), keeping its weights",
                       description="Every float-to-integer cast in the graph (an index, such as the PIT map's) "
                                   "reads where(isfinite(x), x, 0): a cutout whose PDF is not finite can no longer "
                                   "fail the batch it is in, and still comes out non-finite (that object's "
                                   "error). Outputs for finite inputs are bit-identical; the checksum changes.")
    p.add_argument("--model", required=True, help="bundle (.onnx)")
    p.add_argument("--out", default=None, help="where to write it (default: in place)")
    p.add_argument("--version", default=None, help="the revised bundle's model version (recorded as a revision)")
    p.set_defaults(func=_guard_graph)

    p = sub.add_parser("record-prior", help="record a bundle's training-set n(z) in its metadata (what photoz "
                                            "export now does itself)",
                       description="The PDFs a network gives carry its training set's redshift distribution as "
                                   "their prior; a request that asks for another prior divides it out. This "
                                   "counts the true redshifts of --data on the bundle's bins and stores them (the "
                                   "graph is unchanged; the checksum changes).")
    p.add_argument("--model", required=True, help="bundle (.onnx)")
    p.add_argument("--data", required=True, help="the bundle's training set (labelled HDF5 with z)")
    p.add_argument("--n", type=int, default=None, help="count only its first N rows (default: all)")
    p.add_argument("--source", default=None, help="how the record describes the data (default: file name, rows)")
    p.add_argument("--out", default=None, help="write the bundle here (default: in place)")
    p.add_argument("--version", default=None, help="the revised bundle's model version (recorded as a revision)")
    p.set_defaults(func=_record_prior)

    p = sub.add_parser("ood-thresholds", help="measure a bundle's out-of-distribution flag thresholds on its "
                                              "training set and write them into its metadata",
                       description="The quality flags (E(B-V), r flux and signal-to-noise outside the training "
                                   "range, point source, blend) compare features of each cutout with their "
                                   "range on the training set: this measures that range on --data and stores it "
                                   "in the bundle's metadata (the graph is unchanged; the checksum changes).")
    p.add_argument("--model", required=True, help="bundle (.onnx)")
    p.add_argument("--data", required=True, help="the bundle's training set (labelled HDF5)")
    p.add_argument("--n", type=int, default=20_000, help="cutouts to measure (the first N; default 20000)")
    p.add_argument("--out", default=None, help="write the bundle here (default: in place)")
    p.add_argument("--version", default=None, help="new model version for the re-stamped bundle")
    p.set_defaults(func=_ood_thresholds)


def _register_calibration(sub: argparse._SubParsersAction) -> None:
    from photoz.training.release.pit_calibration import add_arguments as add_pit_arguments

    p = sub.add_parser("recalibrate", help="fit a softmax temperature on a checkpoint's validation rows",
                       description="Post-hoc calibration of the PDFs (temperature scaling): the temperature that "
                                   "minimises the validation NLL, written into a new checkpoint; photoz export "
                                   "puts it in the graph.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the recalibrated checkpoint (.pt)")
    p.add_argument("--data", default=None, help="the training data set (default: the checkpoint's)")
    p.set_defaults(func=_recalibrate)

    p = sub.add_parser("calibrate-pit", help="fit a conditional PIT map (PDF recalibration per photometric redshift)",
                       description="Where a model's PDFs are miscalibrated differently at different redshifts (PIT "
                                   "histograms per photometric-redshift bin not flat), a map of each PDF's CDF, "
                                   "fitted on rows the model was not trained on, makes them flat; photoz export "
                                   "--pit-map applies it in the graph.")
    add_pit_arguments(p)
    p.set_defaults(func=_calibrate_pit)
