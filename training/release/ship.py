"""``photoz ship``: a trained run to the shipped bundle and its model card (:class:`ShipJob`).

The order matters: the held-out score must be of the very graph that ships, so a candidate is exported first
(without thresholds, which take minutes and do not change the PDFs), scored, and then exported again with the
score in its record and the flags' thresholds; the injection report of the flags and the card follow.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from photoz.training.release.jobs import ExportJob, ShipJob

log = logging.getLogger("photoz.ship")


def ship(job: ShipJob) -> dict[str, Any]:
    """Run the release (see the module docstring); returns the bundle, the held-out metrics, whether the flags'
    injection targets were met (False also when the report could not run) and the card's path."""
    from photoz.training.evaluation import ood
    from photoz.training.evaluation.evaluate import evaluate
    from photoz.training.release import model_card
    from photoz.training.release.export import export_checkpoint

    run, out = Path(job.run), Path(job.out)
    checkpoints = job.checkpoint or [str(run / "best.pt")]
    candidate = export_checkpoint(ExportJob(checkpoints, str(run / "candidate.onnx"), job.name, job.version,
                                            thresholds=False, pit_map=job.pit_map))
    log.info("candidate %s: scoring on %s", candidate.path, job.test_data)
    metrics = evaluate(candidate.path, job.test_data, run / "eval", baseline_train=job.train_data)
    bundle = export_checkpoint(ExportJob(checkpoints, str(out), job.name, job.version,
                                         held_out_report=str(run / "eval" / "metrics.json"),
                                         reference_data=job.train_data, pit_map=job.pit_map))
    ood_report = run / "eval" / "ood_flags.json"
    ood_report.unlink(missing_ok=True)  # a report left by an earlier release must not reach this card
    ood_status: object
    try:  # the flags' report: a missed target is reported, not fatal (the card shows it)
        ood_status = ood.main(["--model", str(out), "--data", job.test_data, "--out", str(run / "eval")])
    except SystemExit as exc:  # its argument check: the bundle has no thresholds
        ood_status = exc.code
    card = ["--bundle", str(out), "--report", str(run / "eval" / "metrics.json"), "--out", str(out.with_suffix(".md"))]
    model_card.main(card + (["--ood-report", str(ood_report)] if ood_report.is_file() else []))
    return {"bundle": bundle, "metrics": metrics, "ood_targets_met": ood_status == 0,
            "card": str(out.with_suffix(".md"))}
