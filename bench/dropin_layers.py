"""What FastarchLlamaDecoderLayer adds to fastarch.optimize on transformers' SmolLM2-135M
generate, side by side in one run of interleaved rounds: the unmodified model, the model
optimized with its decoder layers left as transformers' (every layer inside swapped, as before
the layer's decode step), and fully optimized. Greedy, batch 1, a 16-token prompt, as
``fastarch bench --dropin``; ms per new token (the generate call's time over the new tokens,
prefill included).

    python bench/dropin_layers.py [--dtype fp32,bf16] [--tokens 64] [--rounds 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fastarch
from fastarch.bench import report
from fastarch.bench.generation import gguf_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    file = gguf_file()
    where = f"{report._cpu_model()}, {args.threads} threads, torch {torch.__version__}"
    print(f"bench/dropin_layers.py: {where}; median of {args.rounds} interleaved rounds;"
          f" load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.dtype.split(","):
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=DTYPES[name]).eval()
        layers_kept = fastarch.optimize(model, inplace=False).model
        for layer in layers_kept.model.layers:
            layer.__class__ = LlamaDecoderLayer  # what optimize left of transformers before the layer swap
        models = {"torch": model, "optimize, layers kept": layers_kept,
                  "optimize": fastarch.optimize(model, inplace=False).model}
        ids = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

        def run(m):
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)

        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.inference_mode():
            tokens = {k: run(m) for k, m in models.items()}  # warm-up, and the tokens compared
            for _ in range(args.rounds):
                for k, m in models.items():
                    start = time.perf_counter()
                    run(m)
                    times[k].append(time.perf_counter() - start)
        ms = {k: sorted(v)[len(v) // 2] * 1e3 / args.tokens for k, v in times.items()}
        same = {k: int((t != tokens["torch"]).sum()) for k, t in tokens.items()}
        row = {"dtype": name, "ms_per_token": ms, "speedup": {k: ms["torch"] / v for k, v in ms.items()},
               "tokens_differing_from_torch": same}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} ms ({ms['torch'] / v:.2f}x)" for k, v in ms.items())
              + f"; tokens differing from torch's: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"where": where, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "env": {k: v for k, v in os.environ.items() if k.startswith(
                                       ("FASTARCH_", "ATEN_", "ONEDNN_", "MKL_"))}},
                       "tokens": args.tokens, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
