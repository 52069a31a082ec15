"""The training run's configuration: one dataclass, from which ``photoz train``'s flags are generated.

Torch-free, so the ``photoz`` command can build its parser without importing torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from photoz.model.pdf import RedshiftBins


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help (and optional ``flag``, ``choices``)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Every knob of a training run (``photoz train --FIELD-NAME``; see ``photoz train --help``)."""

    data: str = field(metadata={"help": "HDF5 data set (images, z, optional ebv)"})
    out_dir: str = field(metadata={"help": "run directory for checkpoints and metrics.csv", "flag": "--out"})
    variant: str = _option("pasquet2019_half", "network variant (photoz summary lists them)")
    epochs: int = _option(30, "passes over the training split")
    batch_size: int = _option(128, "cutouts per step, per process")
    lr: float = _option(1e-4, "Adam learning rate; divided by --lr-drop-factor halfway")
    lr_drop_factor: float = _option(5.0, "learning-rate divisor after half of the epochs")
    weight_decay: float = _option(0.0, "Adam weight decay")
    dropout: float = _option(0.0, "dropout rate after each hidden dense layer (0: none); a network trained with "
                                  "it can be exported with MC dropout (photoz export --mc-passes)")
    validation_fraction: float = _option(0.1, "fraction of objects held out for validation")
    seed: int = _option(0, "seed of the initialisation, batch order, augmentation and dropout (and of the split, "
                           "unless --split-seed is given)")
    split_seed: int | None = _option(None, "seed of the train/validation split (default: --seed); deep-ensemble "
                                           "members trained with different --seed share one split with this, so "
                                           "none of them has trained on the validation rows the ensemble is "
                                           "recalibrated and chosen on")
    workers: int = _option(2, "data-loading worker processes")
    device: str = _option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    amp: bool = _option(True, "bfloat16/float16 autocast on a GPU; bfloat16 on a CPU that has it natively "
                                "(AVX512-BF16 or AMX), float32 on other CPUs")
    max_steps_per_epoch: int | None = _option(None, "cap on steps per epoch (smoke tests)")
    max_validation: int | None = _option(None, "cap on validation objects per epoch")
    preload: bool = _option(False, "hold the whole data set in memory (GPU memory on a GPU) and augment there, "
                                   "instead of streaming from disk: for data sets that fit (100k cutouts = 8 GB)")
    init_from: str | None = _option(None, "start from this bundle's (.onnx) or checkpoint's (.pt) weights instead of "
                                          "random ones (fine-tuning on new data; same variant, no ensemble)")
    z_bins: dict[str, Any] = _option(lambda: RedshiftBins.uniform().to_metadata(), "redshift grid", cli=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, with its type, default and help."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if required else f" (default {f.default})"
        common: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] + shown}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **common)
            continue
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default: dict[str, Any] = {} if required else {"default": f.default}
        parser.add_argument(flag, type=scalar, required=required, choices=f.metadata.get("choices"), **default,
                            **common)


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed flags describe."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]
    return TrainConfig(**{name: getattr(args, name) for name in names})
