"""``fastarch train-gan``, ``fastarch train-ddpm`` and ``fastarch sample``: train the digit
models into a checkpoint directory, and draw grids of digits from a checkpoint (the committed
ones by default)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastarch.generative import CHECKPOINTS
from fastarch.generative.digits import NUM_CLASSES

SAMPLES_PER_CLASS = 30  # the report after training: 300 samples, as many as the real split the floor compares


def add_arguments(sub) -> None:
    for model in ("gan", "ddpm"):
        p = sub.add_parser(f"train-{model}", help=f"train the digit {model.upper()} (seeded, CPU-sized) into a checkpoint directory")
        p.add_argument("--steps", type=int, default=3000 if model == "gan" else 5000, help="optimizer steps")
        p.add_argument("--batch-size", type=int, default=64 if model == "gan" else 32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=Path(f"{model}-digits"), metavar="DIR",
                       help=f"checkpoint directory to write (default ./{model}-digits); also its loss.png")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="draw digits from a trained GAN or DDPM into a PNG grid")
    s.add_argument("--model", choices=("ddpm", "gan"), required=True)
    s.add_argument("--checkpoint", type=Path, metavar="DIR", help="default: the committed {model}-digits checkpoint")
    s.add_argument("--class", dest="class_label", type=int, metavar="K",
                   help="the digit to draw (0-9); default: a row of --n per class (conditional models)")
    s.add_argument("--n", type=int, default=16, help="images (per class when no --class is given; default 16)")
    s.add_argument("--out", type=Path, default=Path("grid.png"), metavar="FILE.png")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm; default 50)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (ddpm)")
    s.add_argument("--guidance", type=float, default=1.5,
                   help="classifier-free guidance scale (ddpm; 1 = none; default 1.5, the best measured: README)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--evaluate", action="store_true",
                   help="also print the samples' quality: class accuracy, confidence, Fréchet distance vs the real floor")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(command: str, message: str) -> int:
    print(f"fastarch {command}: {message}", file=sys.stderr)
    return 2


def _print_quality(images, labels) -> dict:
    from fastarch.generative.quality import evaluate

    report = evaluate(images, labels)
    accuracy = f"class accuracy {report['class_accuracy']:.3f}, " if labels is not None else ""
    print(f"quality of {len(images)} samples: {accuracy}classes covered {report['coverage']:.0%}, mean confidence"
          f" {report['mean_confidence']:.3f}, Fréchet distance to held-out A {report['frechet_distance']:.1f}"
          f" (real held-out B: {report['frechet_floor']:.1f})", file=sys.stderr)
    return report


def _report(model, sample_fn) -> dict:
    import torch

    labels = torch.arange(NUM_CLASSES).repeat_interleave(SAMPLES_PER_CLASS)
    print(f"sampling {SAMPLES_PER_CLASS} per class to measure quality", file=sys.stderr)
    return _print_quality(sample_fn(labels), labels)


def train(args: argparse.Namespace) -> int:
    from fastarch.generative import train as training

    command = args.command
    if args.steps < 1:
        return _fail(command, f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        return _fail(command, f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**64:  # (what torch's generators take)
        return _fail(command, f"--seed must be an int in [0, 2**64), got {args.seed}")
    progress = not args.no_progress
    fit = training.train_gan if command == "train-gan" else training.train_ddpm
    result = fit(steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=progress)
    try:
        if command == "train-gan":
            result.model.save_pretrained(args.out)
        else:
            from fastarch.generative.ddpm import save_ddpm

            save_ddpm(result.model, args.out)
        training.save_loss_curve(result.history, args.out / "loss.png", title=f"{command}, seed {args.seed}")
    except OSError as e:
        return _fail(command, f"cannot write --out {args.out}: {e}")
    print(f"{command}: {args.steps} steps in {result.seconds:.0f} s; wrote {args.out}", file=sys.stderr)
    if command == "train-gan":
        _report(result.model, lambda labels: result.model.sample(len(labels), labels, seed=args.seed))
    else:
        from fastarch.generative.ddpm import sample_digits

        _report(result.model, lambda labels: sample_digits(result.model, labels, seed=args.seed, progress=progress))
    return 0


def sample(args: argparse.Namespace) -> int:
    import torch

    from fastarch.generative.images import save_grid
    from fastarch.models.loading import CheckpointError

    if args.n < 1:
        return _fail("sample", f"--n must be at least 1, got {args.n}")
    if args.class_label is not None and not 0 <= args.class_label < NUM_CLASSES:
        return _fail("sample", f"--class must be a digit 0..{NUM_CLASSES - 1}, got {args.class_label}")
    if args.steps < 1:
        return _fail("sample", f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.seed < 2**64:  # (the gan's sampler had failed with a traceback)
        return _fail("sample", f"--seed must be an int in [0, 2**64), got {args.seed}")
    if args.out.suffix.lower() != ".png":
        return _fail("sample", f"--out must name a .png file, got {args.out}")
    checkpoint = args.checkpoint or CHECKPOINTS / f"{args.model}-digits"
    progress = not args.no_progress
    start = time.perf_counter()
    try:
        if args.model == "gan":
            from fastarch.generative.dcgan import Generator

            model = Generator.from_pretrained(checkpoint)
            conditional = model.config.num_classes is not None
        else:
            from fastarch.generative.ddpm import load_ddpm

            model = load_ddpm(checkpoint)
            conditional = model.config.num_class_embeds is not None
    except (CheckpointError, OSError) as e:
        return _fail("sample", f"cannot load {checkpoint}: {e}")
    if args.class_label is not None and not conditional:
        return _fail("sample", f"{checkpoint} is an unconditional model: drop --class")
    if not conditional:
        labels, nrow = None, None
    elif args.class_label is None:
        labels, nrow = torch.arange(NUM_CLASSES).repeat_interleave(args.n), args.n  # a row per class
    else:
        labels, nrow = torch.full((args.n,), args.class_label), None
    count = args.n if labels is None else len(labels)
    if args.model == "gan":
        from tqdm.auto import tqdm

        with tqdm(total=count, desc="sample", disable=not progress, file=sys.stderr) as bar:
            images = model.sample(count, labels, seed=args.seed)
            bar.update(count)
    else:
        from fastarch.generative.ddpm import sample_digits

        try:
            images = sample_digits(model, labels, n=count, steps=args.steps, eta=args.eta, guidance_scale=args.guidance,
                                   seed=args.seed, progress=progress)
        except ValueError as e:
            return _fail("sample", str(e))
    try:
        save_grid(images, args.out, nrow=nrow)
    except OSError as e:
        return _fail("sample", f"cannot write --out {args.out}: {e}")
    print(f"sample: {count} images in {time.perf_counter() - start:.1f} s; wrote {args.out}", file=sys.stderr)
    if args.evaluate:
        if count < 2:
            return _fail("sample", "--evaluate needs at least 2 images")
        _print_quality(images, labels)
    return 0
