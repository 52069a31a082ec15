"""Model card of a bundle: what it was trained on, its held-out metrics beside the baseline's, its limits.

    python -m photoz.training.release.model_card --bundle model/bundles/photoz-sdss-sim.onnx \
        --report runs/default/eval/metrics.json --out model/bundles/photoz-sdss-sim.md

``make ship`` runs evaluate, export and this in one go.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from photoz.model.bundle import load_bundle

#: The targets the card checks, on a held-out set of the newest simulator
TARGETS: dict[str, Any] = {"sigma_mad_ratio": 0.75, "abs_bias": 0.001, "pit_ks": 0.02, "pit_ks_per_z_bin": 0.05,
           "pit_ks_min_objects": 500, "coverage_68": (0.66, 0.70), "coverage_95": (0.93, 0.97)}


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _maybe(m: dict, key: str, fmt: str) -> str:
    """A metric, or '-' (reports older than the coverage and RAIL metrics lack them)."""
    return format(m[key], fmt) if key in m else "-"


def worst_pit_bin(metrics: dict, binning: str) -> dict | None:
    """The bin of ``binning`` ("by_redshift", "by_photometric_redshift") with the largest PIT KS among those with
    enough objects for the per-bin target, or None."""
    populated = [b for b in metrics.get(binning, []) if b["n"] >= TARGETS["pit_ks_min_objects"] and "pit_ks" in b]
    return max(populated, key=lambda b: b["pit_ks"]) if populated else None


def target_checks(report: dict) -> list[tuple[str, bool, str]]:
    """(target, met, value) for the held-out report: against the strong catalogue baseline (kNN on dereddened
    model magnitudes) when the report has it, else the kNN on observed Petrosian magnitudes."""
    cnn = report["model_metrics"]
    # the kNN of the strong baselines (reports written before "method" existed name it "KNN (k=...) ...")
    strong = [b for b in report.get("strong_baselines", [])
              if b.get("method", b["name"].split(" ")[0] + "PhotoZ") == "KNNPhotoZ"]
    reference = strong[0] if strong else report.get("baseline")
    checks = []
    if reference:
        base = reference["metrics"]
        ratio = cnn["sigma_mad"] / base["sigma_mad"]
        which = "the strong baseline" if strong else "the baseline"
        checks += [(f"sigma_MAD <= 0.75 x {which}'s", ratio <= TARGETS["sigma_mad_ratio"], f"ratio {ratio:.2f}"),
                   (f"outlier fraction below {which}'s", cnn["outlier_fraction"] < base["outlier_fraction"],
                    f"{cnn['outlier_fraction']:.2%} vs {base['outlier_fraction']:.2%}")]
    checks += [("abs(bias) < 0.001", abs(cnn["bias"]) < TARGETS["abs_bias"], f"{cnn['bias']:+.5f}"),
               ("PIT KS < 0.02", cnn["pit_ks"] < TARGETS["pit_ks"], f"{cnn['pit_ks']:.3f}")]
    # in bins of the photometric redshift: a calibrated posterior's PIT is uniform given the data, not given the
    # truth (tests/unit/test_calibration.py: an exact posterior has KS 0.3 in the lowest true-z bin)
    worst = worst_pit_bin(cnn, "by_photometric_redshift")
    if worst:
        checks.append((f"PIT KS < 0.05 in every photometric-z bin with >= {TARGETS['pit_ks_min_objects']} objects",
                       worst["pit_ks"] < TARGETS["pit_ks_per_z_bin"],
                       f"worst {worst['pit_ks']:.3f} (z_phot {worst['lo']:.2f}-{worst['hi']:.2f})"))
    for key, level in (("coverage_68", "68%"), ("coverage_95", "95%")):
        if key in cnn:
            lo, hi = TARGETS[key]
            checks.append((f"{level} interval coverage in {lo:.2f}-{hi:.2f}", lo <= cnn[key] <= hi, f"{cnn[key]:.3f}"))
    return checks


def _initialised_line(start: dict) -> str:
    return (f"- initialised from `{start['file']}` ({start.get('model', 'a checkpoint')} {start.get('version', '')}, "
            f"sha256 `{start['sha256'][:12]}`): fine-tuned, not trained from random weights")


def _recalibration_line(recalibration: dict, fitted_on: dict) -> str:
    knots = recalibration["z_knots"]
    where = (f" on {fitted_on['n']:,} objects of `{fitted_on.get('data', '?')}` ({fitted_on.get('rows', '')})"
             if fitted_on.get("n") else "")
    return (f"- conditional PIT recalibration (photoz calibrate-pit): each PDF's CDF mapped by the PIT distribution "
            f"of objects with a similar photometric redshift ({len(knots)} knots, z {knots[0]:g}-{knots[-1]:g}), "
            f"fitted{where}, applied in the graph after the softmax")


def _row(name: str, m: dict) -> str:
    def maybe(key: str, fmt: str) -> str:
        return _maybe(m, key, fmt)

    return (f"| {name} | {m['sigma_mad']:.4f} | {m['outlier_fraction']:.2%} | {m['bias']:+.5f} | "
            f"{m['crps']:.4f} | {m['pit_ks']:.3f} | {maybe('coverage_68', '.3f')} / {maybe('coverage_95', '.3f')} | "
            f"{maybe('rail_bias', '+.5f')} / {maybe('rail_sigma_iqr', '.4f')} / {maybe('rail_outlier_rate', '.2%')} "
            f"| {m['n']} |")


def flags_section(document: dict, ood_report: dict | None = None) -> list[str]:
    """Markdown: the per-object flags, the bundle's thresholds and (from
    ``python -m photoz.training.evaluation.ood``) how many injected out-of-range objects they catch."""
    from photoz.model.quality import FLAG_BITS

    quality = document.get("quality")
    lines = ["## Flags", "",
             "Every output carries per-object flags (JSON `ancil.flags`, FITS `FLAGS` and `FLAG_BITS`, Parquet and "
             "HDF5 `flags` and `flag_bits`); their definitions are in `photoz.model.quality`. Bits: " +
             ", ".join(f"{bit.bit_length() - 1} `{name}`" for name, bit in FLAG_BITS.items()) + "."]
    if not quality:
        return lines + ["", "This bundle has no training-set thresholds: only `pdf_at_grid_edge`, `masked_pixels` "
                        "and `saturated` are set (`photoz ood-thresholds` adds the rest)."]
    t, ref = quality["thresholds"], quality["reference"]
    lines += ["", f"Thresholds measured on {ref.get('dataset', '?')} ({ref.get('rows', '')}; simulator "
              f"{ref.get('simulator_version', '-')}), tails of {quality['tail_fraction']:.1%} per side "
              f"({', '.join(f'{k} {v:.1%}' for k, v in quality.get('tail_fraction_by_feature', {}).items())}):",
              "", "| threshold | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in t.items() if isinstance(v, float)]
    lines += ["", "The point-source and blend thresholds also vary with the r magnitude (`by_r_mag` in the metadata)."]
    if "blend_net" in quality:
        lines += ["", "Blend detector (`blend_score`, a small convolutional network stored in the metadata, "
                  f"photoz.training.release.blend): trained on {quality['blend_net'].get('trained_on', '?')}."]
    if ood_report:
        lines += ["", f"Injected out-of-range objects made from {ood_report['n']:,} held-out cutouts "
                  f"(`python -m photoz.training.evaluation.ood`, {ood_report['data']}):", "",
                  "| objects | n | intended flag | flagged by it | any out-of-range flag |",
                  "| --- | --- | --- | --- | --- |",
                  f"| in range | {ood_report['n']} | - | - | {ood_report['in_range']['any_ood_flag']:.1%} |"]
        lines += [f"| {kind} | {r['n']} | `{r['flag']}` | {r['intended_flag']:.1%} | {r['any_ood_flag']:.1%} |"
                  for kind, r in ood_report["injected"].items()]
        for kind, r in ood_report["injected"].items():
            for key, bins in r.items():
                if key.startswith("by_") and key != "by_flag":
                    lines += ["", f"{kind} by {key[3:].replace('_', ' ')}, share flagged `{r['flag']}`: " + ", ".join(
                        f"{b['lo']:g}-{b['hi']:g}: {b['intended_flag']:.0%} (n {b['n']})" for b in bins) + "."]
    return lines


def _prior_line(record: dict) -> str:
    return (f"- training n(z), the prior its PDFs carry (a request may ask for another: docs/priors.md): "
            f"{record['n_objects']:,} objects, {record['source']}")


def render(bundle_path: Path, report: dict, figures: list[str], ood_report: dict | None = None) -> str:
    """The model card (Markdown) of a bundle from its held-out report (``photoz evaluate``), figures and the
    flags' injection report."""
    bundle = load_bundle(bundle_path)
    doc = bundle.metadata.document
    cnn = report["model_metrics"]
    lines = _what_it_is(bundle_path, bundle) + _training_lines(doc, report) + _metrics_lines(report)
    lines += _comparison_lines(report) + _binned_lines(cnn)
    lines += [""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    lines += [""] + flags_section(doc, ood_report)
    lines += _limits(doc)
    return "\n".join(lines) + "\n"


def _what_it_is(bundle_path: Path, bundle: Any) -> list[str]:
    doc = bundle.metadata.document
    return [
        f"# Model card: {doc['model']['name']} {doc['model']['version']}", "",
        f"Bundle `{bundle_path.name}`, sha256 `{bundle.sha256}`.", "",
        "## What it is", "",
        f"A `{doc['architecture']['name']}` network (Pasquet et al. 2019 topology, channel width x"
        f"{doc['architecture']['config']['width']}, dense layers of {doc['architecture']['config']['dense_units']}) "
        f"taking {len(doc['bands'])}-band ({', '.join(doc['bands'])}) {doc['cutout_size_pixels']} x "
        f"{doc['cutout_size_pixels']} cutouts at {doc['pixel_scale_arcsec']}\"/pixel "
        f"(pixel unit: {doc['flux_unit']}) plus "
        f"Galactic E(B-V), and returning a PDF on {bundle.metadata.bins.n_bins} redshift bins over "
        f"{bundle.metadata.bins.edges[0]:g} <= z < {bundle.metadata.bins.edges[-1]:g}.", ""]


def _training_lines(doc: dict, report: dict) -> list[str]:
    training = doc["training"]
    lines = [
        "## Training data", "",
        f"- data set: `{training['dataset']['name']}`: {training['dataset']['provenance']}, "
        f"{_n(training['dataset']['n_objects'])} objects ({_n(training['dataset'].get('n_train'))} train, "
        f"{_n(training['dataset'].get('n_validation'))} validation, "
        f"{training['dataset'].get('split') or 'split by object, seed ' + str(training['seed'])}); "
        f"simulator {training['dataset'].get('simulator_version')}, simulation seed {training['dataset'].get('seed')}",
        *([f"- deep ensemble of {training['ensemble']['members']} networks (seeds {training['seed']}), PDFs averaged "
           "in the graph (their spread of mean redshift is the `z_epistemic_std` column): serving costs that many "
           "networks' compute"] if "ensemble" in training else []),
        *([f"- MC dropout: {training['mc_dropout']['passes']} passes through the dense head at dropout rate "
           f"{training['mc_dropout']['rate']:g} (masks drawn from seed {training['mc_dropout']['seed']}, fixed in the "
           "graph), PDFs averaged (their spread of mean redshift is the `z_epistemic_std` column): the convolutions "
           "run once"] if "mc_dropout" in training else []),
        *([_initialised_line(training["initialised_from"])] if training.get("initialised_from") else []),
        f"- epochs: {training['epochs']}, batch {training.get('batch_size')}, Adam at {training.get('learning_rate')} "
        "(divided by 5 halfway), cross-entropy over the bins, random 90-degree rotations and flips",
        *([f"- post-hoc calibration: softmax temperature {training['temperature']:.3f}, fitted on the validation "
           "rows (photoz recalibrate), applied in the graph"]
          if isinstance(training.get("temperature"), float) else []),
        *([_recalibration_line(doc["recalibration"], training.get("pit_recalibration", {}).get("fitted_on", {}))]
          if doc.get("recalibration") else []),
        *([_prior_line(training["n_z"])] if isinstance(training.get("n_z"), dict) else []),
        f"- code commit: `{training['code_commit']}`",
        *[f"- revision {r['version']} (code commit `{r['code_commit']}`): {r['change']}"
          for r in training.get("revisions", [])]]
    if report.get("hardware"):
        lines.append(f"- how: {report['hardware']}")
    return lines


def _metrics_lines(report: dict) -> list[str]:
    cnn = report["model_metrics"]
    knn = report.get("baseline", {}).get("metrics")
    lines: list[str] = []
    lines += ["",
        "## Held-out metrics", "",
        f"On `{report['data']}` ({report['n']:,} simulated galaxies, a separate simulation seed), point estimate "
        f"= PDF {cnn['point_estimate'].replace('z_', '')}, dz = (z_phot - z_spec)/(1 + z_spec), outliers |dz| > 0.05. "
        "Measured with `photoz evaluate`.", "",
        "| | sigma_MAD | outliers | bias | CRPS | PIT KS | 68% / 95% coverage | RAIL: median bias / sigma_IQR / "
        "outliers | n |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        _row("this CNN", cnn)]
    strong = report.get("strong_baselines", [])
    if knn:
        lines.append(_row("kNN baseline", knn))
        lines += [_row(b["name"], b["metrics"]) for b in strong]
        ceiling = report.get("noise_free_ceiling")
        if ceiling:
            lines.append(_row(f"reference, not a baseline: {ceiling['name']}", ceiling["metrics"]))
        lines += ["", f"Baselines: {report['baseline']['name']}"
                  + "".join(f"; {b['name']}" for b in strong) + f", trained on `{report['baseline']['trained_on']}`."
                  + (" The dereddened model magnitudes are the literature's strong catalogue baseline (Beck et al. "
                     "2016): the network is worth its cost only where it beats them." if strong else "")
                  + (" The reference row is what the same kNN does with the simulation's noise-free magnitudes: "
                     "how much of the error is photometric noise rather than the colour-redshift relation itself. "
                     "The simulator fits its model magnitudes with each galaxy's own noise-free profile as the "
                     "template (`photoz.training.simulation.photometry.measure_catalogue`), the least-noisy "
                     "linear flux estimate the pixels allow; fitting one r-band profile to every band, as SDSS "
                     "does, moves the simulated colours by about a tenth of their noise (`python -m "
                     "benchmarks.model_magnitudes`): on this simulation the catalogue baselines see as much of "
                     "the colours as the pixels hold, and the images' smooth bulge + disk galaxies carry little "
                     "redshift information beyond them (docs/simulation.md)."
                     if ceiling else ""), ""]
        lines += ["| target | met | value |", "| --- | --- | --- |"]
        lines += [f"| {name} | {'yes' if ok else '**no**'} | {value} |" for name, ok, value in target_checks(report)]
        by_truth = worst_pit_bin(cnn, "by_redshift")
        lines += ["", "The per-bin PIT target is checked in bins of the *photometric* redshift, what a user selecting "
                  "on the estimate gets. PIT by *true* redshift measures the pull of every estimate towards the bulk "
                  "of the training sample (the per-bin bias below) as much as calibration: a calibrated posterior's "
                  "PIT is uniform given the data, not given the truth. An exact Bayesian posterior for galaxies "
                  "with an SDSS-like n(z) and Gaussian errors of 0.018 (1 + z) has PIT KS 0.3 in the lowest "
                  "true-redshift bin and 0.16-0.22 in the highest (`tests/unit/test_calibration.py`)"
                  + (f"; this network's worst true-redshift bin: {by_truth['pit_ks']:.3f} (z {by_truth['lo']:.2f}-"
                     f"{by_truth['hi']:.2f})." if by_truth else ".")]
    return lines


def _comparison_lines(report: dict) -> list[str]:
    lines: list[str] = []
    if report.get("comparison"):
        lines += ["", "## Uncertainty: the candidates compared", "",
                  "The same held-out galaxies, scored for each way of making the PDF (CRPS: lower is better; PIT "
                  "KS: distance of the PIT from uniform; coverage: share of true redshifts inside the central 68% "
                  "and 95% intervals, ideally 0.68 and 0.95).", "",
                  "| candidate | sigma_MAD | outliers | bias | CRPS | PIT KS | 68% / 95% coverage | RAIL: median bias "
                  "/ sigma_IQR / outliers | n |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [_row(name, metrics) for name, metrics in report["comparison"].items()]
        if report.get("comparison_note"):
            lines += ["", report["comparison_note"]]
    return lines


def _binned_lines(cnn: dict) -> list[str]:
    lines: list[str] = []
    for binning, title, column in (("by_redshift", "By redshift:", "z"),
                                   ("by_photometric_redshift", "By photometric redshift (what a user selecting on "
                                                               "the estimate gets):", "z_phot"),
                                   ("by_r_magnitude", "By Petrosian r magnitude:", "r")):
        if cnn.get(binning):
            lines += ["", title, "", f"| {column} | sigma_MAD | outliers | bias | PIT KS | 68% / 95% coverage | n |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {b['lo']:.2f}-{b['hi']:.2f} | {b['sigma_mad']:.4f} | {b['outlier_fraction']:.2%} | "
                      f"{b['bias']:+.4f} | {_maybe(b, 'pit_ks', '.3f')} | {_maybe(b, 'coverage_68', '.3f')} / "
                      f"{_maybe(b, 'coverage_95', '.3f')} | {b['n']} |" for b in cnn[binning]]
    return lines


def _limits(doc: dict) -> list[str]:
    training = doc["training"]
    lines = ["", "## Limits", "",
              "- Trained on **simulated** SDSS-like cutouts (GalSim bulge + disk galaxies; the simulator version "
              "and its calibration against real SDSS are above and in docs/simulation.md), not on real images. "
              "Real galaxies have structure (spiral arms, "
              "star-forming knots, mergers), colours and artefacts the simulation lacks: **retrain on real "
              "labelled cutouts before scientific use** (`photoz train --data real.h5 ...`, README), "
              "e.g. SDSS DR16+ cutouts of Main Galaxy Sample galaxies with spectroscopic redshifts.",
              "- Valid for SDSS-like data: ugriz, 0.396\"/pixel, nanomaggies, r < 17.77, z < 0.4. Other "
              "surveys need retraining; objects beyond the grid pile up in the last bins "
              "(flag `pdf_at_grid_edge`).",
              "- Few galaxies lie at z > 0.2 (as in the MGS), and the simulation is least like the real sky "
              "there (docs/simulation.md's colour table for the simulator version above): photo-z there "
              "is less reliable and, like every template-free estimator, pulled towards the bulk of the "
              "training sample (the per-bin bias above)."]
    if doc.get("recalibration") or isinstance(training.get("temperature"), (float, list)):
        lines.append("- The PDFs' recalibration (temperature, PIT map) was fitted on galaxies like the training "
                     "set's: it holds where they do. On other data, refit it on labelled galaxies of that data "
                     "(`photoz recalibrate`, `photoz calibrate-pit --data yours.h5`) and check the coverage with "
                     "`photoz evaluate`.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="metrics.json from photoz evaluate")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ood-report", type=Path, default=None,
                        help="ood_flags.json from python -m photoz.training.evaluation.ood "
                             "(injected out-of-range objects)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=METRICS_JSON",
                        help="another candidate's metrics.json on the same held-out data (repeatable): the card "
                             "compares them (e.g. the plain network, MC dropout, an ensemble)")
    parser.add_argument("--compare-note", default=None, help="a sentence under the comparison (costs, the choice)")
    parser.add_argument("--how", default=None, help="how it was made (hardware, times): the card's 'how' line")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if args.how:
        report["hardware"] = args.how
    if args.compare:
        report["comparison"] = {}
        for item in args.compare:
            name, _, path = item.partition("=")
            report["comparison"][name] = json.loads(Path(path).read_text())["model_metrics"]
        report["comparison_note"] = args.compare_note
    figures = []
    for fig in report.get("figures", []):
        target = args.out.parent / f"{args.bundle.stem}-{Path(fig).name}"
        shutil.copyfile(fig, target)
        figures.append(str(target))
    ood = json.loads(args.ood_report.read_text()) if args.ood_report else None
    args.out.write_text(render(args.bundle, report, figures, ood))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
