"""Parity with transformers: rotary_tables' inverse frequencies against ROPE_INIT_FUNCTIONS on
tiny LlamaConfigs (bit for bit), the tables against LlamaRotaryEmbedding's cos/sin, and rotary
against LLaMA's apply_rotary_pos_emb (half-split) and GPT-J's (interleaved, partial)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from fastarch import ops  # noqa: E402
from fastarch.ops.rope.tables import inverse_frequencies  # noqa: E402

HEAD_DIM = 16
MAX_POSITIONS = 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
}


def _config(scaling):
    return LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8,
                       num_hidden_layers=1, vocab_size=8, max_position_embeddings=MAX_POSITIONS, rope_theta=5000.0,
                       rope_scaling=scaling)


def _ours(name, seq_len=None):
    scaling = SCALINGS[name]
    if name == "dynamic":
        scaling = dict(scaling, max_position_embeddings=MAX_POSITIONS)
    return inverse_frequencies(HEAD_DIM, 5000.0, scaling, seq_len)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inverse_frequencies_match_transformers(name):
    config = _config(SCALINGS[name])
    seq_lens = [None, 200] if name == "dynamic" else [None]
    for seq_len in seq_lens:
        if name == "default":
            theirs, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            theirs, factor = ROPE_INIT_FUNCTIONS[SCALINGS[name]["rope_type"]](config, "cpu", seq_len=seq_len)
        ours, our_factor = _ours(name, seq_len)
        assert torch.equal(ours, theirs), name
        assert our_factor == factor
    if name == "dynamic":  # the base grew past the trained context: not the default frequencies
        assert not torch.equal(_ours(name, 200)[0], _ours(name)[0])


@pytest.mark.parametrize("name", ["default", "yarn", "llama3"])
def test_tables_match_llama_rotary_embedding(name):
    rope = LlamaRotaryEmbedding(_config(SCALINGS[name]))
    positions = torch.arange(MAX_POSITIONS)[None]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin, factor = ops.rotary_tables(HEAD_DIM, MAX_POSITIONS, 5000.0, SCALINGS[name])
    assert factor == rope.attention_scaling
    assert torch.equal(ours_cos, cos[0, :, : HEAD_DIM // 2]) and torch.equal(ours_sin, sin[0, :, : HEAD_DIM // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_llama_apply_rotary_pos_emb(dtype):
    rope = LlamaRotaryEmbedding(_config(None))
    g = torch.Generator().manual_seed(0)
    batch, seqlen = 2, 7
    q = torch.randn(batch, 4, seqlen, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(batch, 2, seqlen, HEAD_DIM, generator=g).to(dtype)
    position_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6]])
    cos, sin = rope(q, position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    tables = ops.rotary_tables(HEAD_DIM, MAX_POSITIONS, 5000.0)[:2]
    for positions in (position_ids, torch.tensor([5, 0])):  # every position, or offsets
        q_out, k_out = ops.rotary(q, k, *tables, positions)
        if dtype == torch.float32:  # the same fp32 operations: the same bits
            assert torch.equal(q_out, q_hf) and torch.equal(k_out, k_hf)
        else:
            # transformers rounds cos and sin (2^-9 relative each), both products (2^-9) and the
            # sum to bf16, we the result once: they differ by a few half-ulps of the terms
            # |x1 cos| + |x2 sin| <= sqrt(2) max |x|; 4 * 2^-8 * max |x| covers that, and a sin
            # of the wrong sign or a wrong pairing is off by O(max |x|).
            for ours, theirs, x in ((q_out, q_hf, q), (k_out, k_hf, k)):
                bound = 4 * 2**-8 * x.abs().max().item()
                assert (ours.float() - theirs.float()).abs().max().item() <= bound


def test_rotary_matches_gptj_partial_interleaved():
    rotary_dim, head_dim, max_pos = 8, 12, 32
    table = modeling_gptj.create_sinusoidal_positions(max_pos, rotary_dim)  # (max_pos, rot): sin | cos
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, head_dim, generator=g)  # GPT-J rotates (B, S, H, D)
    position_ids = torch.tensor([[3, 4, 5, 6, 7], [9, 10, 11, 12, 13]])
    sincos = table[position_ids]
    sin, cos = sincos[..., : rotary_dim // 2], sincos[..., rotary_dim // 2 :]
    rotated = modeling_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
    theirs = torch.cat((rotated, x[..., rotary_dim:]), -1)
    ours_cos, ours_sin = table[:, rotary_dim // 2 :].contiguous(), table[:, : rotary_dim // 2].contiguous()
    ours, _ = ops.rotary(x.transpose(1, 2), x.transpose(1, 2), ours_cos, ours_sin, position_ids, interleaved=True)
    assert torch.equal(ours.transpose(1, 2), theirs)
