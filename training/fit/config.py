"""The training run's configuration: one job object (:mod:`photoz.jobs`), from which ``photoz train``'s flags are
generated.

Torch-free, so the ``photoz`` command can build its parser without importing torch.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from photoz import jobs
from photoz.jobs import option
from photoz.model.pdf import RedshiftBins


@dataclass
class TrainConfig:
    """Every knob of a training run (``photoz train --FIELD-NAME``; see ``photoz train --help``)."""

    data: str = field(metadata={"help": "HDF5 data set (images, z, optional ebv)"})
    out_dir: str = field(metadata={"help": "run directory for checkpoints and metrics.csv", "flag": "--out"})
    variant: str = option("pasquet2019_half", "network variant (photoz summary lists them)")
    epochs: int = option(30, "passes over the training split")
    batch_size: int = option(128, "cutouts per step, per process")
    lr: float = option(1e-4, "Adam learning rate; divided by --lr-drop-factor halfway")
    lr_drop_factor: float = option(5.0, "learning-rate divisor after half of the epochs")
    weight_decay: float = option(0.0, "Adam weight decay")
    dropout: float = option(0.0, "dropout rate after each hidden dense layer (0: none); a network trained with "
                                  "it can be exported with MC dropout (photoz export --mc-passes)")
    validation_fraction: float = option(0.1, "fraction of objects held out for validation")
    seed: int = option(0, "seed of the initialisation, batch order, augmentation and dropout (and of the split, "
                           "unless --split-seed is given)")
    split_seed: int | None = option(None, "seed of the train/validation split (default: --seed); deep-ensemble "
                                           "members trained with different --seed share one split with this, so "
                                           "none of them has trained on the validation rows the ensemble is "
                                           "recalibrated and chosen on")
    workers: int = option(2, "data-loading worker processes")
    device: str = option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    amp: bool = option(True, "bfloat16/float16 autocast on a GPU; bfloat16 on a CPU that has it natively "
                                "(AVX512-BF16 or AMX), float32 on other CPUs")
    max_steps_per_epoch: int | None = option(None, "cap on steps per epoch (smoke tests)")
    max_validation: int | None = option(None, "cap on validation objects per epoch")
    preload: bool = option(False, "hold the whole data set in memory (GPU memory on a GPU) and augment there, "
                                   "instead of streaming from disk: for data sets that fit (100k cutouts = 8 GB)")
    init_from: str | None = option(None, "start from this bundle's (.onnx) or checkpoint's (.pt) weights instead of "
                                          "random ones (fine-tuning on new data; same variant, no ensemble)")
    z_bins: dict[str, Any] = option(lambda: RedshiftBins.uniform().to_metadata(), "redshift grid", cli=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, with its type, default and help."""
    jobs.add_arguments(parser, TrainConfig)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed flags describe."""
    return jobs.from_arguments(args, TrainConfig)
