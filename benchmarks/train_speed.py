"""Training throughput benchmark: cutouts/s of a training step for each network variant.

    python -m benchmarks.train_speed [--device auto|cpu|cuda] [--variants pasquet2019_half,pasquet2019]

One training step = forward + cross-entropy + backward + Adam update on a
batch already in device memory (what ``photoz train --preload`` feeds), with
the same mixed precision ``photoz train`` uses (bfloat16 autocast on a GPU).
On a CPU, side by side: float32 in the default memory layout, float32
channels-last, and (where the CPU has bfloat16 natively: AVX512-BF16/AMX)
bfloat16 autocast channels-last, the last available being what ``photoz
train`` uses. Also the in-memory augmentation cost per batch. Prints a table
and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

from photoz.model.network.pasquet import build, variant_config  # noqa: E402
from photoz.training.fit.train import augment_batch, cpu_has_bfloat16  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(variant: str, device, batch_size: int, steps: int, amp: bool, channels_last: bool = False) -> dict:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = build(variant_config(variant)).to(device).train().to(memory_format=memory_format)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    images = (torch.rand(batch_size, 5, 64, 64, device=device) * 10).contiguous(memory_format=memory_format)
    ebv = torch.full((batch_size, 1), 0.03, device=device)
    target = torch.randint(net.config.n_bins, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net.logits(images, ebv), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 10)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    rot, flip = torch.randint(4, (batch_size,)), torch.randint(2, (batch_size,))
    plain = images.contiguous()  # augmentation runs before the layout change, as in photoz train
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        augment_batch(plain, rot, flip)
    _sync(device)
    return {"variant": variant, "precision": "bf16 autocast" if amp else "fp32",
            "memory_format": "channels_last" if channels_last else "default",
            "parameters": sum(p.numel() for p in net.parameters()), "batch_size": batch_size,
            "steps": steps, "cutouts_per_s": steps * batch_size / elapsed,
            "augment_ms_per_batch": 1e3 * (time.perf_counter() - t1) / steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variants", default="pasquet2019_half,pasquet2019")
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on GPU, 5 on CPU)")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (200 if cuda else 5)
    if cuda:  # (autocast, channels-last) as photoz train runs
        arrangements = [(not args.no_amp, False)]
    else:
        arrangements = [(False, False), (False, True)] + ([(True, True)] if cpu_has_bfloat16() and not args.no_amp
                                                          else [])
    rows = [time_variant(v, device, int(b), steps, amp, channels_last)
            for v in args.variants.split(",") for b in args.batch_sizes.split(",")
            for amp, channels_last in arrangements]
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    print(f"training step throughput on {name} (torch {torch.__version__}; photoz train uses the last arrangement)")
    print("| variant | precision | memory format | parameters | batch | cutouts/s | augmentation ms/batch |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['precision']} | {r['memory_format']} | {r['parameters']:,} | {r['batch_size']} "
              f"| {r['cutouts_per_s']:.0f} | {r['augment_ms_per_batch']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train-speed-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
