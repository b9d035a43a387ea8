"""stages.data: tokenizers, prepare-data (Megatron files), the stage stream, blends, checks.

Files written by the project are read back with the independent reader in
``tests/helpers/data_helpers.py`` (struct + numpy from the documented layout), and files the
project reads are written by the independent writer there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data import (
    ByteTokenizer,
    DataError,
    TrainStream,
    check_data,
    embedded_files,
    eval_batches,
    prepare_corpus,
)
from stages.data import prepare as prepare_mod
from stages.data.prepare import prepare
from tests.conftest import assert_one_line_error
from tests.helpers.data_helpers import TEXTS, prepare_cli, read_megatron, read_prepared, write_inputs, write_megatron

BYTE = ByteTokenizer()


def byte_doc(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [BYTE.eos_id]


# ---------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("text", TEXTS + ["", "\x00\xff binary-ish \U0001f600"])
def test_byte_tokenizer_round_trip(text):
    ids = BYTE.encode(text)
    assert ids.max(initial=0) < 256 and BYTE.decode(ids) == text
    assert BYTE.decode(np.append(ids, [BYTE.eos_id, BYTE.bos_id, BYTE.pad_id])) == text  # specials dropped
    assert BYTE.vocab_size == 259 and (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (256, 257, 258)


def test_hf_tokenizer_json_and_checkpoint_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2}
    for word in "document plain ascii def f x return record".split():
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))
    paths, docs = write_inputs(tmp_path / "in", zst=False, parquet=False)
    m = prepare([str(p) for p in paths], str(ckpt), tmp_path / "out" / "hf", progress=False)  # a directory
    assert (m["vocab_size"], m["eos_id"], m["bos_id"], m["dtype"]) == (len(vocab), 1, 2, "uint16")
    got = read_prepared(tmp_path / "out" / "hf")
    want = [tok.encode(d, add_special_tokens=False).ids + [1] for d in docs]
    assert [list(g) for g in got] == want
    with pytest.raises(DataError, match="eos_token 'nope' is not in the vocabulary"):
        prepare([str(paths[0])], str(ckpt / "tokenizer.json"), tmp_path / "x", eos_token="nope", progress=False)


def train_sentencepiece(tmp_path: Path, vocab: int = 200) -> Path:
    """A small SentencePiece model trained on the embedded corpus (standard-library text)."""
    spm = pytest.importorskip("sentencepiece")
    _, files = embedded_files(400_000)
    text = tmp_path / "sp_train.txt"
    text.write_text("\n".join(f.read_text(errors="ignore") for f in files))
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
                                   input_sentence_size=20000, shuffle_input_sentence=False)
    return prefix.with_suffix(".model")


def test_sentencepiece_prepare_matches_the_model(tmp_path):
    model = train_sentencepiece(tmp_path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    paths, docs = write_inputs(tmp_path / "in", zst=False, parquet=False)
    m = prepare([str(p) for p in paths], str(model), tmp_path / "sp_data", progress=False)
    assert (m["vocab_size"], m["eos_id"], m["bos_id"]) == (200, 2, 1)
    assert [list(d) for d in read_prepared(tmp_path / "sp_data")] == [sp.encode(d) + [2] for d in docs]


# ---------------------------------------------------------------------- prepare-data
@pytest.mark.slow
def test_prepare_data_cli_output_is_the_documents_plus_eos(tmp_path):
    paths, docs = write_inputs(tmp_path / "in")
    out = tmp_path / "out" / "corpus"
    proc = prepare_cli(*paths, "--tokenizer", "byte", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(docs)} documents" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json"]
    got = read_megatron(out)
    assert [list(g) for g in got] == [byte_doc(d) for d in docs]  # every document, in order, + EOS
    assert got[0].dtype == np.uint16
    manifest = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert manifest["documents"] == len(docs) and manifest["tokens"] == sum(len(g) for g in got)


@pytest.mark.slow
def test_workers_shards_resume_and_no_op(tmp_path, monkeypatch):
    big = tmp_path / "in" / "big.jsonl"
    big.parent.mkdir()
    rng = np.random.default_rng(0)
    records = [f"line {i} " + "x" * int(rng.integers(0, 3000)) for i in range(2500)]
    big.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))  # ~3.7 MB: 4 units of 1 MB
    want = [byte_doc(r) for r in records]
    one = prepare([str(big)], "byte", tmp_path / "w1" / "c", workers=1, progress=False)
    two = prepare([str(big)], "byte", tmp_path / "w2" / "c", workers=2, progress=False)
    assert one["shards"] == two["shards"] == ["c"]
    assert (tmp_path / "w1" / "c.bin").read_bytes() == (tmp_path / "w2" / "c.bin").read_bytes()
    assert (tmp_path / "w1" / "c.idx").read_bytes() == (tmp_path / "w2" / "c.idx").read_bytes()
    assert [list(d) for d in read_megatron(tmp_path / "w1" / "c")] == want

    sharded = prepare([str(big)], "byte", tmp_path / "s" / "c", shard_size="2MB", progress=False)
    assert len(sharded["shards"]) >= 2 and sharded["shards"][0] == f"c-00000-of-{len(sharded['shards']):05d}"
    assert [list(d) for d in read_prepared(tmp_path / "s" / "c")] == want  # shards concatenate to the input

    # Interrupted after two units: the re-run keeps them and tokenizes only the rest.
    calls = []
    real = prepare_mod.tokenize_unit

    def flaky(unit, *args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(unit.index)
        return real(unit, *args, **kw)

    monkeypatch.setattr(prepare_mod, "tokenize_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(big)], "byte", tmp_path / "r" / "c", progress=False)
    assert not (tmp_path / "r" / "c.json").exists() and not (tmp_path / "r" / "c.idx").exists()
    monkeypatch.setattr(prepare_mod, "tokenize_unit", lambda u, *a, **k: (calls.append(u.index), real(u, *a, **k))[1])
    prepare([str(big)], "byte", tmp_path / "r" / "c", progress=False)
    assert calls == [0, 1, 2, 3]  # units 0 and 1 were not redone
    assert (tmp_path / "r" / "c.bin").read_bytes() == (tmp_path / "w1" / "c.bin").read_bytes()
    assert not (tmp_path / "r" / "c.parts").exists()
    stamp = (tmp_path / "r" / "c.bin").stat().st_mtime_ns
    prepare([str(big)], "byte", tmp_path / "r" / "c", progress=False)  # finished: a no-op
    assert calls == [0, 1, 2, 3] and (tmp_path / "r" / "c.bin").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "tokenizer_file", "tokenizer_kind", "field_first", "field_later",
                                  "shard_size", "workers", "empty"])
def test_prepare_data_bad_input_is_one_line(tmp_path, case):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "ok"}\n' * 3)
    out = tmp_path / "out" / "c"
    args, needles = {
        "missing": ([tmp_path / "nope.jsonl"], ["nope.jsonl", "input not found"]),
        "tokenizer_file": ([good, "--tokenizer", tmp_path / "tok.model"], ["tok.model", "not found"]),
        "tokenizer_kind": ([good, "--tokenizer", good], ["good.jsonl", "unknown tokenizer file type"]),
        "field_first": ([good, "--field", "body"], ["good.jsonl:1", "'body'"]),
        "field_later": ([tmp_path / "late.jsonl"], ["late.jsonl:3", "'text'"]),
        "shard_size": ([good, "--shard-size", "infGB"], ["--shard-size"]),
        "workers": ([good, "--workers", "0"], ["--workers"]),
        "empty": ([tmp_path / "empty.jsonl"], ["empty.jsonl", "no non-empty document"]),
    }[case]
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "late.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    proc = prepare_cli(*args, "--out", out, "--quiet")
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert not out.with_suffix(".json").exists() and not out.with_suffix(".bin").exists()  # nothing published


def test_jsonl_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """The jsonl reader never calls read() on the whole file (issue 16: 200 MB took 651 MB RSS)."""
    from stages.data import sources

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(100)))
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("read whole")))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError("read whole")))
    unit = sources.plan_units([path])[0]
    assert [t for t, _ in sources.iter_unit(unit, "text")] == [f"t{i}" for i in range(100)]


# ---------------------------------------------------------------------- the stream
def synthetic(tmp_path: Path, name: str, n_docs: int, base: int, seed: int = 0) -> Path:
    """Documents whose tokens are distinct ids base, base+1, …: a token names its position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 60, size=n_docs)
    ids = base + np.arange(int(lengths.sum()))
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    write_megatron(tmp_path / name, docs, dtype=np.int32)
    return tmp_path / name


def indexed_info(tmp_path, paths, weights=(), eval_fraction=0.1, parent=None, vocab=70000, **kw):
    cfg = {"source": "indexed", "paths": [str(p) for p in paths], "weights": list(weights),
           "eval_fraction": eval_fraction, "vocab_size": vocab, **kw}
    check_data(cfg, vocab)
    return prepare_corpus(cfg, tmp_path / "cache", parent=parent)


def test_no_sample_repeats_within_an_epoch(tmp_path):
    info = indexed_info(tmp_path, [synthetic(tmp_path, "a", 300, 0)])
    seq = 16
    stream = TrainStream(info, seq, micro_batch_size=4, grad_accum=2, dp_world=1)
    per_epoch = info["n_tokens"]["train"] // seq
    starts = []
    step = 0
    while len(starts) < 2 * per_epoch:
        for x, y in stream.step_batches(step):
            assert torch.equal(x[:, 1:], y[:, :-1])
            starts += x[:, 0].tolist()
        step += 1
    first, second = starts[:per_epoch], starts[per_epoch:2 * per_epoch]
    assert len(set(first)) == per_epoch  # tokens name positions: no window twice in epoch 0
    assert len(set(second)) >= per_epoch - 1  # epoch 1 (the one window across the boundary aside)
    assert first != second  # another document order in the next epoch
    assert stream.position(step)["data_epoch"] >= 1


def test_blend_proportions_over_10k_samples(tmp_path):
    bases = [0, 100_000, 200_000]
    paths = [synthetic(tmp_path, f"d{k}", 400, b, seed=k) for k, b in enumerate(bases)]
    weights = [0.5, 0.3, 0.2]
    info = indexed_info(tmp_path, paths, weights, vocab=300_000)
    stream = TrainStream(info, 8, micro_batch_size=10, grad_accum=1, dp_world=2, dp_rank=0)
    other = TrainStream(info, 8, micro_batch_size=10, grad_accum=1, dp_world=2, dp_rank=1)
    rows = torch.cat([s.step_batches(step)[0][0] for step in range(500) for s in (stream, other)])
    assert len(rows) == 10_000
    share = np.bincount(rows[:, 0].numpy() // 100_000, minlength=3) / len(rows)
    for got, want in zip(share, weights, strict=True):
        assert abs(got - want) <= 0.02 * want, share  # within ±2 % of the weight
    assert np.abs(share - weights).max() <= 2 / 10_000  # in fact within a sample or two
    pos = stream.position(500)
    assert pos["data_tokens_end"] == 10_000 * 8
    assert sum(pos["data_positions"].values()) == 10_000 * 8


def test_batches_are_pure_and_layout_independent(tmp_path):
    info = indexed_info(tmp_path, [synthetic(tmp_path, "a", 200, 0), synthetic(tmp_path, "b", 200, 50_000, 1)],
                        [0.6, 0.4])
    fresh = TrainStream(info, 16, micro_batch_size=4, grad_accum=2, dp_world=2, dp_rank=1)
    seen = TrainStream(info, 16, micro_batch_size=4, grad_accum=2, dp_world=2, dp_rank=1)
    for step in range(12):  # an uninterrupted run reaches step 7 …
        run = seen.step_batches(step)
    resumed = TrainStream(info, 16, micro_batch_size=4, grad_accum=2, dp_world=2, dp_rank=1).step_batches(11)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, resumed, strict=True))
    assert not torch.equal(fresh.step_batches(10)[0][0], resumed[0][0])
    # 2 ranks × 4 rows × 2 micro = one rank × 16 rows: the global batch does not depend on the layout.
    two = [TrainStream(info, 16, 4, 2, 2, r) for r in range(2)]
    one = TrainStream(info, 16, 16, 1, 1, 0)
    for step in (0, 5):
        rows = torch.cat([two[r].batch(step, m)[0] for m in range(2) for r in range(2)])
        assert torch.equal(rows, one.batch(step)[0])


def test_grown_stage_continues_the_parents_stream(tmp_path):
    info = indexed_info(tmp_path, [synthetic(tmp_path, "a", 300, 0)])
    parent = TrainStream(info, 16, micro_batch_size=4, grad_accum=1, dp_world=2)
    summary = parent.position(7)  # what the worker writes into summary.json
    assert summary["data_tokens_start"] == 0 and summary["data_tokens_end"] == 7 * 8 * 16
    child_info = indexed_info(tmp_path, [tmp_path / "a"], parent=summary)
    child = TrainStream(child_info, 32, micro_batch_size=2, grad_accum=3, dp_world=1)  # other seq_len, batch
    assert child.tokens_start == summary["data_tokens_end"]
    assert child.position(0)["data_tokens_start"] == summary["data_tokens_end"]
    # The child's first token is the token at the parent's end position of the stream.
    longer = TrainStream(info, 16, micro_batch_size=4, grad_accum=1, dp_world=2)
    next_first = longer.batch(7)[0][0, 0]  # rank 0, the first sample after the parent's 7 steps
    assert child.batch(0)[0][0, 0] == next_first
    end = child.position(5)
    assert end["data_tokens_end"] == summary["data_tokens_end"] + 5 * 6 * 32


def test_eval_split_held_out_by_document(tmp_path):
    info = indexed_info(tmp_path, [synthetic(tmp_path, "a", 300, 0)], eval_fraction=0.2)
    assert 0.1 < info["n_docs"]["eval"] / 300 < 0.3
    assert info["n_tokens"]["train"] + info["n_tokens"]["eval"] == sum(len(d) for d in read_megatron(tmp_path / "a"))
    train_tokens = set()
    stream = TrainStream(info, 16, 8, 1, 1)
    for step in range(info["n_tokens"]["train"] // 128):
        train_tokens |= set(stream.batch(step)[0].flatten().tolist())
    first = eval_batches(info, 16, 4, 3)
    again = eval_batches(info, 16, 4, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    eval_tokens = set(torch.cat([x for x, _ in first]).flatten().tolist())
    assert eval_tokens and not eval_tokens & train_tokens  # held-out text never trains
    own = indexed_info(tmp_path, [tmp_path / "a"], eval_paths=[str(synthetic(tmp_path, "e", 30, 60_000))])
    assert own["eval_from"] == "paths" and int(eval_batches(own, 16, 4, 1)[0][0].min()) >= 60_000


# ---------------------------------------------------------------------- stage data (embedded / files)
def test_embedded_corpus_goes_through_prepare_data_cached(tmp_path):
    root, files = embedded_files(300_000)
    assert files == embedded_files(300_000)[1]
    assert sum(f.stat().st_size for f in files) <= 300_000 and len(files) > 3
    assert all("site-packages" not in f.parts and f.suffix in (".py", ".txt", ".rst") for f in files)
    cfg = {"source": "embedded", "max_bytes": 300_000, "eval_fraction": 0.1}
    info = prepare_corpus(cfg, tmp_path)
    prefix = info["train"][0]["prefix"]
    assert Path(prefix + ".json").is_file() and info["n_tokens"]["eval"] > 0 and info["vocab_size"] == 259
    docs = read_megatron(prefix)
    texts = [f.read_bytes() for f in files]
    utf8 = [t for t in texts if _is_utf8(t)]
    assert [bytes(d[:-1].astype(np.uint8)) for d in docs] == utf8 and all(d[-1] == 257 for d in docs)
    stamp = Path(prefix + ".bin").stat().st_mtime_ns
    again = prepare_corpus(cfg, tmp_path)
    assert again == info and Path(prefix + ".bin").stat().st_mtime_ns == stamp  # cached
    assert prepare_corpus({**cfg, "max_bytes": 200_000}, tmp_path)["train"][0]["prefix"] != prefix


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_files_source_and_cache_invalidation(tmp_path):
    paths, docs = write_inputs(tmp_path / "in", zst=False, parquet=False)
    cfg = {"source": str(tmp_path / "in"), "eval_fraction": 0.2}
    info = prepare_corpus(cfg, tmp_path / "cache")
    assert info["n_docs"]["train"] + info["n_docs"]["eval"] == len(docs)
    (tmp_path / "in" / "doc0.txt").write_text("changed")
    assert prepare_corpus(cfg, tmp_path / "cache")["train"][0]["prefix"] != info["train"][0]["prefix"]
    with pytest.raises(DataError, match="at least 2"):
        (tmp_path / "one").mkdir()
        (tmp_path / "one" / "a.txt").write_text("only")
        prepare_corpus({"source": str(tmp_path / "one")}, tmp_path / "cache")


# ---------------------------------------------------------------------- checks before workers
def test_indexed_checks_name_the_file_or_field(tmp_path):
    a = synthetic(tmp_path, "a", 50, 0)
    with pytest.raises(DataError, match="data.weights has 1 values but data.paths has 2"):
        check_data({"source": "indexed", "paths": [str(a), str(a)], "weights": [1.0]}, 70000)
    check_data({"source": "indexed", "paths": [str(a)], "vocab_size": 70000}, 70000)
    with pytest.raises(DataError, match=r"b: no dataset here"):
        check_data({"source": "indexed", "paths": [str(tmp_path / "b")]}, 70000)
    with pytest.raises(DataError, match=r"a.bin: token id \d+ is outside the vocabulary 0..258"):
        check_data({"source": "indexed", "paths": [str(a)]}, 70000)  # no manifest, tokenizer byte: ids < 259
    write_megatron(tmp_path / "small", [np.arange(10), np.arange(20)])
    with pytest.raises(DataError, match="has 259 tokens but stage.model has only 200"):
        check_data({"source": "indexed", "paths": [str(tmp_path / "small")]}, 200)
    check_data({"source": "indexed", "paths": [str(tmp_path / "small")]}, 259)
    with open(tmp_path / "small.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match=r"small.bin: 62 bytes, but .*small.idx describes 60"):
        check_data({"source": "indexed", "paths": [str(tmp_path / "small")]}, 259)
    raw = bytearray((tmp_path / "small.idx").read_bytes())
    (tmp_path / "small.idx").write_bytes(bytes(raw[:-8]))
    with pytest.raises(DataError, match=r"small.idx: \d+ bytes, but its header"):
        check_data({"source": "indexed", "paths": [str(tmp_path / "small")]}, 259)
    os.remove(tmp_path / "small.bin")
    with pytest.raises(DataError, match=r"small.bin: not found"):
        check_data({"source": "indexed", "paths": [str(tmp_path / "small")]}, 259)
