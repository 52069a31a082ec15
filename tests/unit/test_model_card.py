import json

from photoz.training.release.model_card import render


def test_card_states_data_metrics_targets_and_limits(tiny_bundle, tmp_path):
    m = {"point_estimate": "z_mean", "sigma_mad": 0.012, "outlier_fraction": 0.01, "bias": 0.0004, "crps": 0.008,
         "pit_ks": 0.03, "n": 1000, "by_redshift": [{"lo": 0.0, "hi": 0.05, "sigma_mad": 0.01,
                                                   "outlier_fraction": 0.0, "bias": 0.0, "n": 100}]}
    knn = dict(m, sigma_mad=0.022, outlier_fraction=0.04)
    report = {"data": "sim-test.h5", "n": 1000, "model_metrics": m,
              "baseline": {"name": "kNN", "trained_on": "sim-train.h5", "metrics": knn}}
    card = render(tiny_bundle, report, ["photoz_diagnostics.png"])
    assert "| this CNN | 0.0120 | 1.00% | +0.00040 | 0.0080 | 0.030 | - / - | - / - / - | 1000 |" in card
    full = dict(m, coverage_68=0.672, coverage_95=0.951, rail_bias=0.0003, rail_sigma_iqr=0.0121,
                rail_outlier_rate=0.008, by_photometric_redshift=[dict(m["by_redshift"][0], pit_ks=0.04)])
    card_full = render(tiny_bundle, dict(report, model_metrics=full), [])
    assert "| 0.672 / 0.951 | +0.00030 / 0.0121 / 0.80% | 1000 |" in card_full
    assert "| 0.00-0.05 | 0.0100 | 0.00% | +0.0000 | 0.040 | - / - | 100 |" in card_full
    by_mag = dict(full, by_r_magnitude=[dict(m["by_redshift"][0], lo=17.0, hi=17.5, pit_ks=0.021, coverage_68=0.69,
                                              coverage_95=0.95)])
    card_mag = render(tiny_bundle, dict(report, model_metrics=by_mag), [])
    assert "By Petrosian r magnitude:" in card_mag and "| 17.00-17.50 | 0.0100 | 0.00% | +0.0000 | 0.021 | 0.690 / " \
        "0.950 | 100 |" in card_mag
    assert "By Petrosian r magnitude:" not in card_full
    assert "| kNN baseline | 0.0220 | 4.00% |" in card
    assert "| sigma_MAD <= 0.75 x the baseline's | yes | ratio 0.55 |" in card
    assert "| PIT KS < 0.02 | **no** | 0.030 |" in card
    assert "retrain on real labelled cutouts" in card and "**simulated**" in card
    assert "refit it on labelled galaxies" not in card  # nothing recalibrated in this bundle
    bad = dict(report, model_metrics=dict(m, bias=0.01))
    assert "| abs(bias) < 0.001 | **no** | +0.01000 |" in render(tiny_bundle, bad, [])
    json.dumps(report)


def test_card_checks_issue_targets_against_the_strong_baseline_and_compares_candidates(tiny_bundle, tmp_path):
    """The sigma_MAD target is against the kNN on dereddened model magnitudes when the report has it; PIT KS is
    checked in every photometric-redshift bin with >= 500 objects and the intervals' coverage against 0.66-0.70 /
    0.93-0.97; other candidates' metrics (--compare) get a table."""
    from photoz.training.release.model_card import main

    def binned(sigma, c68, c95, bins):
        return [{"lo": 0.05 * i, "hi": 0.05 * (i + 1), "sigma_mad": sigma, "outlier_fraction": 0.0, "bias": 0.0,
                 "pit_ks": ks, "coverage_68": c68, "coverage_95": c95, "n": n} for i, (n, ks) in enumerate(bins)]

    def metrics(sigma, pit_ks=0.015, c68=0.68, c95=0.95, bins=((600, 0.03), (100, 0.2))):
        # the target reads the photometric-redshift bins; the true-redshift ones (KS 0.3, as for an exact
        # posterior) are reported beside it
        return {"point_estimate": "z_mean", "sigma_mad": sigma, "outlier_fraction": 0.01, "bias": 0.0002,
                "crps": 0.008, "pit_ks": pit_ks, "coverage_68": c68, "coverage_95": c95, "n": 700,
                "by_redshift": binned(sigma, c68, c95, ((600, 0.3), (100, 0.2))),
                "by_photometric_redshift": binned(sigma, c68, c95, bins)}

    report = {"data": "sim-test.h5", "n": 700, "model_metrics": metrics(0.0120),
              "baseline": {"name": "kNN", "trained_on": "t.h5", "metrics": metrics(0.030)},
              "strong_baselines": [{"name": "KNN (k=16) on dereddened model magnitudes", "trained_on": "t.h5",
                                    "metrics": metrics(0.0150)}]}
    card = render(tiny_bundle, report, [])
    assert "| sigma_MAD <= 0.75 x the strong baseline's | **no** | ratio 0.80 |" in card  # not 0.40 (old kNN)
    assert "reference, not a baseline" not in card
    # the kNN is found by its method, wherever it is listed and whatever its name
    by_method = dict(report, strong_baselines=[
        {"name": "local linear", "method": "LocalLinearPhotoZ", "trained_on": "t.h5", "metrics": metrics(0.0100)},
        {"name": "nearest neighbours", "method": "KNNPhotoZ", "trained_on": "t.h5", "metrics": metrics(0.0150)}])
    assert "| sigma_MAD <= 0.75 x the strong baseline's | **no** | ratio 0.80 |" in render(tiny_bundle, by_method, [])
    ceiling = {"name": "kNN (k=16) on noise-free dereddened r + 4 colours (simulation truth)",
               "metrics": metrics(0.0093)}
    with_ceiling = render(tiny_bundle, dict(report, noise_free_ceiling=ceiling), [])
    assert "| reference, not a baseline: kNN (k=16) on noise-free dereddened r + 4 colours (simulation truth) | " \
           "0.0093 |" in with_ceiling
    assert "| sigma_MAD <= 0.75 x the strong baseline's | **no** | ratio 0.80 |" in with_ceiling  # not the target
    assert "| KNN (k=16) on dereddened model magnitudes | 0.0150 |" in card
    # the bin of 100 objects with PIT KS 0.2 does not count; the one of 600 at 0.03 passes
    assert "| PIT KS < 0.05 in every photometric-z bin with >= 500 objects | yes | worst 0.030 (z_phot 0.00-0.05) |" \
        in card
    assert "this network's worst true-redshift bin: 0.300 (z 0.00-0.05)" in card
    assert "| 68% interval coverage in 0.66-0.70 | yes | 0.680 |" in card
    narrow = render(tiny_bundle, dict(report, model_metrics=metrics(0.011, c68=0.60, bins=((600, 0.08),))), [])
    assert "| 68% interval coverage in 0.66-0.70 | **no** | 0.600 |" in narrow
    assert "| PIT KS < 0.05 in every photometric-z bin with >= 500 objects | **no** | worst 0.080" in narrow
    assert "| 0.00-0.05 | 0.0110 | 0.00% | +0.0000 | 0.300 | 0.600 / 0.950 | 600 |" in narrow  # by true z
    assert "| 0.00-0.05 | 0.0110 | 0.00% | +0.0000 | 0.080 | 0.600 / 0.950 | 600 |" in narrow  # by photometric z
    # the command line: candidates compared, the 'how' line
    (tmp_path / "main.json").write_text(json.dumps(report))
    (tmp_path / "mc.json").write_text(json.dumps({"model_metrics": metrics(0.0125, pit_ks=0.011)}))
    out = tmp_path / "card.md"
    assert main(["--bundle", str(tiny_bundle), "--report", str(tmp_path / "main.json"), "--out", str(out),
                 "--compare", f"MC dropout={tmp_path / 'mc.json'}", "--compare-note", "MC costs 1.2x.",
                 "--how", "on a CPU"]) == 0
    text = out.read_text()
    assert "## Uncertainty: the candidates compared" in text and "| MC dropout | 0.0125 |" in text
    assert "MC costs 1.2x." in text and "- how: on a CPU" in text


def test_flags_section_lists_thresholds_and_injections():
    from photoz.training.release.model_card import flags_section

    quality = {"tail_fraction": 0.001, "tail_fraction_by_feature": {"asymmetry": 0.005},
               "reference": {"dataset": "train.h5", "rows": "first 10 of 10"},
               "thresholds": {"ebv_max": 0.17, "by_r_mag": {}}}
    ood = {"n": 10, "data": "held.h5", "in_range": {"any_ood_flag": 0.01},
           "injected": {"star": {"n": 10, "flag": "point_source", "intended_flag": 0.9, "any_ood_flag": 0.95},
                        "blend": {"n": 4, "flag": "blend", "intended_flag": 0.5, "any_ood_flag": 0.5,
                                  "by_separation_arcsec": [{"lo": 1.5, "hi": 2.0, "n": 2, "intended_flag": 0.0},
                                                           {"lo": 2.0, "hi": 3.0, "n": 2, "intended_flag": 1.0}]}}}
    text = "\n".join(flags_section({"quality": quality}, ood))
    assert "| ebv_max | 0.17 |" in text and "| star | 10 | `point_source` | 90.0% | 95.0% |" in text
    assert "blend by separation arcsec, share flagged `blend`: 1.5-2: 0% (n 2), 2-3: 100% (n 2)." in text
    assert "Blend detector" not in text
    detector = "\n".join(flags_section({"quality": {**quality, "blend_net": {"trained_on": "the same 10 cutouts"}}}))
    assert "Blend detector (`blend_score`" in detector and "trained on the same 10 cutouts." in detector
    assert "8 `low_snr`" in text
    bare = "\n".join(flags_section({}))
    assert "no training-set thresholds" in bare and "ebv_max" not in bare


def test_evaluate_prints_the_reference_row_and_the_bins_of_both_redshifts():
    from photoz.training.evaluation.evaluate import format_report

    def m(sigma, ks):
        return {"sigma_mad": sigma, "outlier_fraction": 0.01, "bias": 0.001, "crps": 0.01, "pit_ks": ks, "n": 900}

    report = {"model_metrics": dict(m(0.018, 0.005), by_redshift=[dict(m(0.014, 0.31), lo=0.0, hi=0.05)],
                                    by_photometric_redshift=[dict(m(0.010, 0.032), lo=0.0, hi=0.05)]),
              "noise_free_ceiling": {"name": "kNN noise-free", "metrics": m(0.0093, 0.02)}}
    text = format_report(report)
    assert "(reference) kNN, noise-free magnitudes" in text and "0.0093" in text
    assert "0.00 <= z < 0.05: sigma_MAD 0.0140" in text and "PIT KS 0.310" in text
    assert "0.00 <= z_phot < 0.05: sigma_MAD 0.0100" in text and "PIT KS 0.032" in text
