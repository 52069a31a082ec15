"""Layer-by-layer summary of a network, like Keras' ``model.summary()``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from photoz.model.network.pasquet import PasquetNet


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int


def _flops(module: nn.Module, output: torch.Tensor) -> int:
    """Floating-point operations per cutout (a multiply-add counts as 2)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return 2 * module.in_channels // module.groups * k * output[0].numel()
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    return 0


def layer_table(net: PasquetNet) -> list[LayerRow]:
    """Run one cutout through ``net`` and record every leaf layer."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in net.named_modules():
        if list(module.children()):
            continue

        def hook(mod: nn.Module, _inputs: Any, output: torch.Tensor, name: str = name) -> None:
            rows.append(LayerRow(
                name=name,
                kind=type(mod).__name__,
                output_shape=tuple(output.shape[1:]),
                params=sum(p.numel() for p in mod.parameters(recurse=False)),
                flops=_flops(mod, output),
            ))

        hooks.append(module.register_forward_hook(hook))
    cfg = net.config
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, cfg.n_bands, cfg.cutout_size, cfg.cutout_size), torch.zeros(1, 1))
    finally:
        for h in hooks:
            h.remove()
    return rows


def format_summary(net: PasquetNet, variant: str) -> str:
    rows = layer_table(net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in net.buffers())
    flops = sum(r.flops for r in rows)
    lines = [f"Model: {variant}  ({net.config})", "-" * 96,
             f"{'Layer (type)':<52}{'Output shape':<22}{'Param #':>10}{'MFLOP':>12}", "=" * 96]
    for r in rows:
        shape = "(" + ", ".join(str(s) for s in r.output_shape) + ")"
        lines.append(f"{r.name + ' (' + r.kind + ')':<52}{shape:<22}{r.params:>10,}{r.flops / 1e6:>12.2f}")
    lines += ["=" * 96,
              f"Total params: {trainable + frozen:,}",
              f"Trainable params: {trainable:,}",
              f"Non-trainable params: {frozen:,} (plus {buffers:,} fixed buffer values: input normalisation)",
              f"FLOPs per cutout: {flops / 1e9:.3f} GFLOP (multiply-add = 2)",
              "-" * 96]
    return "\n".join(lines)
