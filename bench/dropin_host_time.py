"""The host time fastarch.optimize adds or saves, measured on a CPU: ``fastarch bench --dropin``'s
UNet and MiniLM at tiny widths (so each kernel takes a few microseconds and a call's time is
its Python and dispatch), one thread, each model unmodified and optimized, side by side in
interleaved rounds, with a row per swapped layer kind.

Why: on a GPU these models' small calls are host-bound (the kernels finish before the host has
issued the next), so what a GPU run of ``--dropin`` measures is this host time. The H200 run of
2026-12-04 measured the optimized UNet at 0.67x and MiniLM at 0.70x diffusers / transformers;
this proxy gave 0.65x for that tree's UNet on an AMD EPYC. fastarch's Conv2d is held to torch's
convolution here, as it runs on a GPU (its CPU paths, Winograd and oneDNN's packed layout, are
CPU kernels, not host time).

    python bench/dropin_host_time.py [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fastarch
import fastarch.nn.conv as fastarch_conv
from fastarch.bench import report


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def side_by_side(pair: dict, rounds: int, calls: int) -> dict[str, float]:
    """The best of ``rounds`` interleaved rounds of each contender, ms per call."""
    for fn in pair.values():
        for _ in range(3):
            fn()
    best = {name: float("inf") for name in pair}
    for r in range(rounds):
        for name, fn in pair.items() if r % 2 == 0 else reversed(pair.items()):
            best[name] = min(best[name], per_call_ms(fn, calls))
    return best


def unet_cases():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
    ).eval()
    fast = fastarch.optimize(model, inplace=False).model
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    h, temb = torch.randn(1, 32, 4, 4), torch.randn(1, 128)
    yield "unet step (1x3x8x8)", lambda m: m(x, t), (model, fast), 20
    yield "  ResnetBlock2D", lambda m: m.down_blocks[1].resnets[0](h, temb), (model, fast), 500
    yield "  Attention", lambda m: m.down_blocks[1].attentions[0](h), (model, fast), 500
    yield "  GroupNorm", lambda m: m.conv_norm_out(h), (model, fast), 2000
    yield "  Linear", lambda m: m.time_embedding.linear_1(torch.randn(1, 32)), (model, fast), 2000


def bert_cases():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config).eval()
    fast = fastarch.optimize(model, inplace=False).model
    lengths = [9 + (i * 7) % 37 for i in range(32)]  # --dropin's MiniLM batch: 32 sentences, 9-45 tokens
    ids = torch.randint(5, 100, (32, max(lengths)), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    ln = torch.randn(4, 32)
    yield "bert encoder (32 x 9-45 tokens)", lambda m: m(input_ids=ids, attention_mask=mask), (model, fast), 10
    yield "  LayerNorm", lambda m: m.encoder.layer[0].output.LayerNorm(ln), (model, fast), 2000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)
    fastarch_conv._can_pack = lambda x, weight: False  # torch's convolution, as on a GPU
    cpu = report._cpu_model()
    print(f"host time of fastarch.optimize's paths: {cpu}, 1 thread, torch {torch.__version__};"
          f" best of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':<34} {'unmodified':>11} {'optimized':>10} {'speedup':>8}")
    rows = []
    with torch.inference_mode():
        for cases in (unet_cases, bert_cases):
            for name, call, (model, fast), calls in cases():
                best = side_by_side({"unmodified": lambda: call(model), "optimized": lambda: call(fast)}, args.rounds,
                                    calls)
                unit = 1e3 if name.startswith("  ") else 1.0  # layers in us, models in ms
                a, b = best["unmodified"] * unit, best["optimized"] * unit
                rows.append({"case": name.strip(), "unit": "us" if unit > 1 else "ms", "unmodified": a,
                             "optimized": b, "speedup": a / b})
                print(f"{name:<34} {a:>9.3f}{rows[-1]['unit']:>2} {b:>8.3f}{rows[-1]['unit']:>2} {a / b:>7.2f}x",
                      flush=True)
    if args.json:
        meta = {"cpu": cpu, "machine": platform.machine(), "threads": 1, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
