"""Trust, second pass (issue 22), the data side: compressed inputs must end cleanly,
prepare-data locks its --out, manifests stay in their folder, data=indexed refuses what
would train on wrong tokens; every refusal one line, exit 2. In-process, seconds."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from stages.data import DataError, check_data, prepare_corpus
from stages.data import prepare as prepare_mod
from stages.data.prepare import prepare
from stages.prepare_data import main as prepare_main
from tests.conftest import assert_one_line_error
from tests.helpers.data_helpers import read_prepared, write_megatron

zstandard = pytest.importorskip("zstandard")


def prep(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = prepare_main([str(a) for a in args] + ["--quiet"])
    return rc, capsys.readouterr().err


def jsonl_lines(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(start, start + n)]


# ---------------------------------------------------------------------- compressed inputs end cleanly
def zst_frames(lines: list[bytes], frames: int) -> list[bytes]:
    per = len(lines) // frames
    c = zstandard.ZstdCompressor()
    return [c.compress(b"".join(lines[k * per:(k + 1) * per])) for k in range(frames)]


def test_truncated_zst_is_refused_not_read_short(tmp_path, capsys):
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(b"".join(jsonl_lines(1000)))
    whole = zstandard.ZstdCompressor().compress(b"".join(jsonl_lines(1000, 1000)))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    rc, err = prep(capsys, ok, cut, "--out", tmp_path / "o" / "c")
    assert_one_line_error(rc, err, "cut.jsonl.zst", "truncated")
    assert rc == 2 and not (tmp_path / "o" / "c.json").exists()


def test_zst_cut_in_frame_3_of_4_is_refused_and_every_frame_is_read(tmp_path, capsys):
    lines = jsonl_lines(200)
    frames = zst_frames(lines, 4)
    full = tmp_path / "full.jsonl.zst"
    full.write_bytes(b"".join(frames))
    rc, err = prep(capsys, full, "--out", tmp_path / "full")
    assert rc == 0, err
    assert len(read_prepared(tmp_path / "full")) == 200  # all four frames, not the first
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(b"".join(frames[:2]) + frames[2][: len(frames[2]) // 2])
    rc, err = prep(capsys, cut, "--out", tmp_path / "cut")
    assert_one_line_error(rc, err, "cut.jsonl.zst", "truncated")


@pytest.mark.parametrize("record", [b'\xef\xbb\xbf{"text": "a"}\n', b'{"text":\r"a"}\n'], ids=["bom", "cr"])
def test_gz_reads_a_record_exactly_as_plain_jsonl(tmp_path, capsys, record):
    (tmp_path / "a.jsonl").write_bytes(record)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(record))
    for name in ("a.jsonl", "a.jsonl.gz"):
        rc, err = prep(capsys, tmp_path / name, "--out", tmp_path / name.replace(".", "_"))
        assert rc == 0, err
    assert [list(d) for d in read_prepared(tmp_path / "a_jsonl")] == \
        [list(d) for d in read_prepared(tmp_path / "a_jsonl_gz")]


# ---------------------------------------------------------------------- one --out, one run
def test_second_prepare_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"".join(jsonl_lines(50)))
    b.write_bytes(b"".join(jsonl_lines(70, 500)))
    out = tmp_path / "o" / "c"
    real = prepare_mod._run_units
    second: list[tuple[int, str]] = []

    def first_runs_units(*args, **kw):  # while the first run holds --out, a second one starts
        second.append(prep(capsys, b, "--out", out))
        return real(*args, **kw)

    monkeypatch.setattr(prepare_mod, "_run_units", first_runs_units)
    manifest = prepare([str(a)], "byte", out, progress=False)
    rc, err = second[0]
    assert_one_line_error(rc, err, str(out), "another prepare-data", f"pid {os.getpid()}")
    assert rc == 2
    assert manifest["documents"] == 50 and len(read_prepared(out)) == 50
    assert not (tmp_path / "o" / ".c.lock").exists()  # released with the run


# ---------------------------------------------------------------------- manifests and indexed data
def prepared(tmp_path: Path, name: str = "c", docs: int = 20) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_bytes(b"".join(jsonl_lines(docs)))
    out = tmp_path / "data" / name
    prepare([str(src)], "byte", out, progress=False)
    return out


def indexed(paths, **kw) -> dict:
    return {"source": "indexed", "paths": [str(p) for p in paths], "tokenizer": "byte", **kw}


@pytest.mark.parametrize("shards", [["../x/good"], ["/etc/passwd"], [], [5], ["."]],
                         ids=["dotdot", "absolute", "empty", "not-a-name", "dot"])
def test_manifest_shards_must_be_plain_names_beside_it(tmp_path, shards):
    out = prepared(tmp_path)
    (tmp_path / "x").mkdir()
    for suffix in (".bin", ".idx"):  # a dataset really is there, outside the manifest's folder
        (tmp_path / "x" / f"good{suffix}").write_bytes(Path(f"{out}{suffix}").read_bytes())
    manifest = json.loads(Path(f"{out}.json").read_text())
    Path(f"{out}.json").write_text(json.dumps({**manifest, "shards": shards}))
    with pytest.raises(DataError, match="c.json") as err:
        check_data(indexed([out]))
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("second", ["same", "idx", "bin"])
def test_a_dataset_named_twice_is_refused(tmp_path, second):
    out = prepared(tmp_path)
    other = {"same": str(out), "idx": f"{out}.idx", "bin": f"{out}.bin"}[second]
    with pytest.raises(DataError, match="name each dataset once"):
        check_data(indexed([out, other]))
    with pytest.raises(DataError, match="name each dataset once"):
        prepare_corpus(indexed([out, other]), tmp_path / "cache")


def float_tokens(prefix: Path, code: int, values: np.ndarray) -> Path:
    """A Megatron dataset whose .idx claims a float dtype (code 6 float64, 7 float32)."""
    write_megatron(prefix, [np.arange(10), np.arange(10, 30)], dtype=np.int32)
    dtype = np.float64 if code == 6 else np.float32
    Path(f"{prefix}.bin").write_bytes(values.astype(dtype).tobytes())
    idx = Path(f"{prefix}.idx")
    raw = bytearray(idx.read_bytes())
    raw[17] = code  # magic (9) + version (8) → the dtype code byte
    count = struct.unpack_from("<Q", raw, 18)[0]
    lengths = np.frombuffer(bytes(raw[34:34 + 4 * count]), dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize)])
    raw[34 + 4 * count:34 + 12 * count] = pointers.astype(np.int64).tobytes()
    idx.write_bytes(bytes(raw))
    return prefix


@pytest.mark.parametrize("code,values", [(6, np.arange(30) + 0.5), (7, np.arange(30) + 0.25),
                                         (7, np.full(30, np.nan))], ids=["float64", "float32", "nan"])
def test_float_token_files_are_refused(tmp_path, code, values):
    prefix = float_tokens(tmp_path / "f", code, values)
    with pytest.raises(DataError, match="float type; token ids must be integers"):
        check_data(indexed([prefix], vocab_size=300))


def test_all_empty_documents_are_refused(tmp_path):
    write_megatron(tmp_path / "e", [np.zeros(0, np.int32)] * 3, dtype=np.int32)
    with pytest.raises(DataError, match="holds no tokens"):
        prepare_corpus(indexed([tmp_path / "e"], vocab_size=300), tmp_path / "cache")


def test_weights_summing_to_infinity_are_refused(tmp_path):
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b")
    with pytest.raises(DataError, match="sum to infinity"):
        check_data(indexed([a, b], weights=[1e308, 1e308]))


# ---------------------------------------------------------------------- prepare-data, one line each
def _surrogate(d: Path) -> Path:
    (d / "s.jsonl").write_text('{"text": "ok"}\n{"text": "\\ud800"}\n')
    return d / "s.jsonl"


def _cesu8(d: Path) -> Path:
    (d / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xed\xa0\x80\xed\xb0\x80"}\n')
    return d / "c.jsonl"


def _nested(d: Path) -> Path:
    (d / "n.jsonl").write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    return d / "n.jsonl"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.jsonl")
    return d / "pipe.jsonl"


@pytest.mark.parametrize("make,needles", [
    (_surrogate, ["s.jsonl:2", "lone surrogate"]),
    (_cesu8, ["c.jsonl:2", "lone surrogate"]),
    (_nested, ["n.jsonl:2", "nested too deeply"]),
    (_fifo, ["pipe.jsonl", "not a regular file"]),
], ids=["surrogate", "cesu8", "nested", "fifo"])
@pytest.mark.parametrize("tokenizer", ["byte", "hf", "sp"])
def test_bad_documents_are_one_line_for_every_tokenizer(tmp_path, capsys, make, needles, tokenizer):
    spec = {"byte": "byte", "hf": _hf_tokenizer, "sp": _sp_tokenizer}[tokenizer]
    spec = spec if isinstance(spec, str) else spec(tmp_path)
    rc, err = prep(capsys, make(tmp_path), "--tokenizer", spec, "--out", tmp_path / "o" / "c")
    assert_one_line_error(rc, err, *needles)
    assert rc == 2


def _hf_tokenizer(tmp_path: Path) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "ok": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


def _sp_tokenizer(tmp_path: Path) -> str:
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(f"ok document {i} words" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return str(tmp_path / "sp.model")


def test_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(b"".join(jsonl_lines(3)))
    (tmp_path / "afile").write_text("a file, not a folder")
    rc, err = prep(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "afile" / "c")
    assert_one_line_error(rc, err, str(tmp_path / "afile" / "c"), "cannot write")
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission half needs a user
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = prep(capsys, tmp_path / "a.jsonl", "--out", locked / "c")
        assert_one_line_error(rc, err, str(locked / "c"), "cannot write")
    finally:
        locked.chmod(0o700)


def test_shard_size_below_the_minimum_is_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(b"".join(jsonl_lines(3)))
    rc, err = prep(capsys, tmp_path / "a.jsonl", "--shard-size", "1", "--out", tmp_path / "c")
    assert_one_line_error(rc, err, "--shard-size", "minimum")
    assert rc == 2 and not (tmp_path / "c.bin").exists()
