"""The ``fastarch`` command: ``fastarch info``, ``fastarch bench`` and ``fastarch generate``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastarch", description="fastarch kernels: information and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    bench = sub.add_parser("bench", help="time fastarch's ops against PyTorch eager and torch.compile")
    from fastarch.bench.cli import add_arguments

    add_arguments(bench)
    _add_generate(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "info":
        from fastarch.system_info import info

        info()
        return 0
    from fastarch.bench.cli import run

    return run(args)


# ----------------------------------------------------------------------------- fastarch generate


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a decoder model, streamed to stdout")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", help="a Hugging Face checkpoint directory (config.json, weights, tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on the CPU, bfloat16 on a GPU")
    g.add_argument("--device", help="default: cuda when available, else cpu")


def _generate(args) -> int:
    import sys

    import torch

    from fastarch.models import CheckpointError
    from fastarch.models.generate import TextGenerator

    if args.model is None:
        print("fastarch generate: give the model with --model PATH (a checkpoint directory with config.json,"
              " weights and tokenizer)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        gen = TextGenerator.from_pretrained(args.model, dtype=dtype, device=device)
        options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed)
        for piece in gen.stream(args.prompt, chat=args.chat, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (CheckpointError, ValueError, OSError) as e:
        print(f"\nfastarch generate: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text before the figures when both go to one terminal
    s = gen.stats
    prefill = s["prompt_tokens"] / s["prefill_s"] if s["prefill_s"] else float("nan")
    decode = (s["new_tokens"] - 1) / s["decode_s"] if s["decode_s"] else float("nan")
    print(f"prefill: {s['prompt_tokens']} tokens, {prefill:.1f} tokens/s; decode: {s['new_tokens']} tokens,"
          f" {decode:.1f} tokens/s", file=sys.stderr)
    return 0
