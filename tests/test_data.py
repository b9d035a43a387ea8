"""stages.data: tokenizers, the memory-mapped token files, deterministic batches, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data import (
    ByteTokenizer,
    DataError,
    TokenBatches,
    embedded_files,
    eval_batches,
    prepare_corpus,
)

TEXTS = ["héllo wörld — ünïcode ✓\n", "def f(x):\n    return x * 2\n", "日本語のテキスト", "plain ascii"]


def write_corpus(root: Path, n: int = 40) -> Path:
    """n small text documents (distinct, varied lengths) in root/corpus/."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(n):
        (corpus / f"doc{i:03d}.txt").write_text(f"document {i}: " + TEXTS[i % len(TEXTS)] * (1 + i % 5))
    return corpus


def small_cfg(source: Path | str, **overrides) -> dict:
    cfg = {"source": str(source), "tokenizer": "byte", "eval_fraction": 0.2, "jsonl_field": "text",
           "max_bytes": 200_000}
    cfg.update(overrides)
    return cfg


def split_docs(info: dict, split: str) -> list[np.ndarray]:
    tokens = np.memmap(info["paths"][split], dtype=info["dtype"], mode="r")
    starts = list(np.load(info["docs"][split])) + [len(tokens)]
    return [np.asarray(tokens[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


# ---------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("text", TEXTS + ["", "\x00\xff binary-ish \U0001f600"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.max(initial=0) < 256 and tok.decode(ids) == text
    assert tok.decode(np.append(ids, [tok.eos_id, tok.bos_id, tok.pad_id])) == text  # specials dropped
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2}
    for word in "document plain ascii def f x return".split():
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    info = prepare_corpus(small_cfg(write_corpus(tmp_path), tokenizer=str(path)), tmp_path / "cache")
    assert (info["vocab_size"], info["eos_id"], info["bos_id"], info["dtype"]) == (len(vocab), 1, 2, "uint16")
    for doc in split_docs(info, "train") + split_docs(info, "eval"):
        assert doc[-1] == 1 and 1 not in doc[:-1]
    with pytest.raises(DataError, match="eos_token 'nope' is not in the vocabulary"):
        prepare_corpus(small_cfg(tmp_path / "corpus", tokenizer=str(path), eos_token="nope"), tmp_path / "c2")


# ---------------------------------------------------------------------- token files
def test_memmap_documents_and_boundaries(tmp_path):
    corpus = write_corpus(tmp_path)
    info = prepare_corpus(small_cfg(corpus), tmp_path / "cache", seed=3)
    assert info["dtype"] == "uint16" and info["vocab_size"] == 259 and info["eos_id"] == 257
    docs = split_docs(info, "train") + split_docs(info, "eval")
    assert len(docs) == 40 == info["n_docs"]["train"] + info["n_docs"]["eval"]
    tok = ByteTokenizer()
    originals = {p.read_text() for p in corpus.iterdir()}
    decoded = set()
    for doc in docs:
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]  # exactly one EOS, at the end
        decoded.add(tok.decode(doc[:-1]))
    assert decoded == originals  # every document once, losslessly
    for split in ("train", "eval"):
        size = Path(info["paths"][split]).stat().st_size
        assert size == info["n_tokens"][split] * 2


def test_eval_split_is_disjoint_by_document_and_seeded(tmp_path):
    corpus = write_corpus(tmp_path, n=60)
    a = prepare_corpus(small_cfg(corpus), tmp_path / "cache", seed=0)
    b = prepare_corpus(small_cfg(corpus), tmp_path / "cache", seed=1)
    tok = ByteTokenizer()
    train = {tok.decode(d) for d in split_docs(a, "train")}
    held = {tok.decode(d) for d in split_docs(a, "eval")}
    assert held and train and not train & held
    assert 0.05 < len(held) / 60 < 0.45  # about eval_fraction = 0.2
    assert held != {tok.decode(d) for d in split_docs(b, "eval")}  # the seed picks other documents


def test_tiny_corpus_still_gets_both_splits(tmp_path):
    corpus = tmp_path / "two"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document " * 20)
    (corpus / "b.txt").write_text("second document " * 20)
    info = prepare_corpus(small_cfg(corpus, eval_fraction=0.01), tmp_path / "cache")
    assert info["n_docs"] == {"train": 1, "eval": 1}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only")
    with pytest.raises(DataError, match="at least 2"):
        prepare_corpus(small_cfg(tmp_path / "one"), tmp_path / "cache")


def test_jsonl_documents_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i} " * (i + 1), "id": i}) for i in range(30)))
    info = prepare_corpus(small_cfg(path), tmp_path / "cache")
    assert info["n_docs"]["train"] + info["n_docs"]["eval"] == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        prepare_corpus(small_cfg(bad), tmp_path / "cache")
    with pytest.raises(DataError, match="not 'embedded' or an existing"):
        prepare_corpus(small_cfg(tmp_path / "missing"), tmp_path / "cache")


def test_embedded_corpus_is_real_capped_and_deterministic(tmp_path):
    root, files = embedded_files(300_000)
    assert files == embedded_files(300_000)[1]
    assert sum(f.stat().st_size for f in files) <= 300_000 and len(files) > 3
    assert all("site-packages" not in f.parts and f.suffix in (".py", ".txt", ".rst") for f in files)
    info = prepare_corpus({"source": "embedded", "max_bytes": 300_000, "eval_fraction": 0.1}, tmp_path)
    assert info["source"] == "embedded" and info["n_tokens"]["eval"] > 0
    text = ByteTokenizer().decode(np.memmap(info["paths"]["train"], dtype="uint16", mode="r")[:5000])
    assert "def " in text or "import " in text  # it is Python's own source


# ---------------------------------------------------------------------- caching
def test_cache_reuse_and_invalidation(tmp_path):
    corpus = write_corpus(tmp_path)
    first = prepare_corpus(small_cfg(corpus), tmp_path / "cache")
    stamp = Path(first["paths"]["train"]).stat().st_mtime_ns
    second = prepare_corpus(small_cfg(corpus), tmp_path / "cache")
    assert second == first and Path(second["paths"]["train"]).stat().st_mtime_ns == stamp
    (corpus / "doc000.txt").write_text("changed text")
    third = prepare_corpus(small_cfg(corpus), tmp_path / "cache")
    assert third["dir"] != first["dir"]
    assert prepare_corpus(small_cfg(corpus, eval_fraction=0.3), tmp_path / "cache")["dir"] != third["dir"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp dirs left


# ---------------------------------------------------------------------- batches
@pytest.fixture
def info(tmp_path):
    return prepare_corpus(small_cfg(write_corpus(tmp_path, n=60), eval_fraction=0.3), tmp_path / "cache")


def test_batches_are_a_pure_function_of_their_arguments(info):
    a = TokenBatches(info, "train", seq_len=16, micro_batch_size=4, seed=7)
    b = TokenBatches(info, "train", seq_len=16, micro_batch_size=4, seed=7)
    x, y = a.batch(5, 1, dp_rank=1, dp_world=2)
    assert x.dtype == torch.long and x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for _ in range(2):  # any order, any instance: the same batch (resume replays the data)
        b.batch(9, 0, 0, 2)
        x2, y2 = b.batch(5, 1, dp_rank=1, dp_world=2)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(a.batch(6, 1, 1, 2)[0], x)
    assert not torch.equal(a.batch(5, 0, 1, 2)[0], x)
    assert not torch.equal(TokenBatches(info, "train", 16, 4, seed=8).batch(5, 1, 1, 2)[0], x)
    ranks = torch.cat([a.batch(5, 1, r, 2)[0] for r in range(2)])
    assert len({tuple(row.tolist()) for row in ranks}) == 8  # ranks get different rows
    assert int(x.max()) < info["vocab_size"]


def test_eval_batches_fixed_and_held_out(info):
    first = eval_batches(info, seq_len=16, micro_batch_size=4, n=3)
    again = eval_batches(info, seq_len=16, micro_batch_size=4, n=3)
    assert len(first) == 3 and all(x.shape == (4, 16) for x, _ in first)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    held = bytes(np.memmap(info["paths"]["eval"], dtype="uint16", mode="r").astype(np.uint8))
    for x, _ in first:
        for row in x:
            assert bytes(row.to(torch.uint8).tolist()) in held


def test_too_short_split_is_a_clear_error(info):
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenBatches(info, "eval", seq_len=10**7, micro_batch_size=1)
    with pytest.raises(DataError, match="split must be"):
        TokenBatches(info, "test", seq_len=8, micro_batch_size=1)
