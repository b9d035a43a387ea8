"""A stage's data: the ``data`` config group, preparation (cached), checks, the resolved info.

``DataCfg`` is the schema of ``conf/data/*.yaml`` (``stages.schema.TrainConfig.data``).
Three sources, one path: ``embedded`` (the standard library's own text) and a file/dir/glob
of documents are run through prepare-data into ``CACHE/<key>/corpus`` (key = a digest of
the inputs and the tokenizer; a finished entry is reused); ``indexed`` reads Megatron
datasets that already exist (``data.paths``, blended by ``data.weights``).

``prepare_stage_data`` returns the JSON-safe *info* the workers train from (it goes into
``stage_config.json`` as ``data``)::

    train        [{prefix, key, shards, weight, documents, tokens}], one per blended dataset
    eval         the same for ``data.eval_paths`` (empty when held out by fraction)
    eval_from    "fraction" (``data.eval_fraction`` of each dataset's documents) | "paths"
    seed, eval_fraction, vocab_size, eos_id, bos_id, pad_id, tokenizer, dtype, source
    n_tokens, n_docs   {train, eval} totals after the split
    paths        {train, eval}: the first .bin each split reads
    start        {tokens, positions}: where this stage's stream starts (its parent's end)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.data import indexed
from stages.data.errors import DataError
from stages.data.prepare import prepare, read_manifest
from stages.data.sources import list_inputs, precheck
from stages.data.stream import Documents
from stages.data.tokenizers import load_tokenizer

EMBEDDED_SUFFIXES = (".py", ".txt", ".rst")
# Standard-library folders left out of the embedded corpus: test data (odd encodings,
# generated noise), installed packages (differ between machines), build products.
EMBEDDED_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests",
                 "idle_test", "lib2to3"}
CORPUS_NAME = "corpus"
VOCAB_SAMPLE_TOKENS = 1 << 20  # token ids checked against the vocabulary per dataset, before workers


@dataclass
class DataCfg:
    """Where tokens come from; defaults need no download."""

    source: str = "embedded"  # embedded | indexed (data.paths) | a file/dir/glob of documents
    paths: list[str] = field(default_factory=list)  # indexed: Megatron prefixes (PREFIX.bin/.idx [+ .json])
    weights: list[float] = field(default_factory=list)  # blend weights per path; empty = by token count
    eval_paths: list[str] = field(default_factory=list)  # held-out prefixes; empty = eval_fraction of docs
    tokenizer: str = "byte"  # byte | tokenizer.json | tokenizer.model | a checkpoint dir holding one
    # where prepared corpora go (default RUN_DIR/data); a resume may change it (stages.schema.setting)
    cache_dir: str | None = field(default=None, metadata={"resume": "may_change"})
    eval_fraction: float = 0.02  # documents held out (by a seeded hash) when eval_paths is empty
    max_bytes: int = 8_000_000  # cap on the embedded corpus size
    jsonl_field: str = "text"  # jsonl field / parquet column of a document source
    seed: int = 0  # held-out documents and the per-epoch document order; one value per schedule
    vocab_size: int | None = None  # indexed sets without a prepare-data manifest: None = data.tokenizer's
    eos_token: str | None = None  # tokenizer.json only: None = found by name (</s>, <|endoftext|>, …)
    bos_token: str | None = None
    workers: int = 1  # prepare-data processes for a document source


def as_data_cfg(cfg: DataCfg | dict[str, Any]) -> DataCfg:
    if isinstance(cfg, DataCfg):
        return cfg
    names = {f.name for f in dataclasses.fields(DataCfg)}
    return DataCfg(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(cfg).items()
                      if k in names})


def validate(cfg: DataCfg) -> None:
    """Field rules (no files read)."""
    if not 0.0 < cfg.eval_fraction < 1.0 and not (cfg.source == "indexed" and cfg.eval_paths):
        raise DataError(f"data.eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.vocab_size is not None and cfg.vocab_size < 1:
        raise DataError(f"data.vocab_size must be positive, got {cfg.vocab_size}")
    if cfg.workers < 1:
        raise DataError(f"data.workers must be >= 1, got {cfg.workers}")
    if cfg.source == "indexed":
        if not cfg.paths:
            raise DataError("data.paths is empty: data=indexed needs data.paths=[PREFIX,...]")
        if cfg.weights and len(cfg.weights) != len(cfg.paths):
            raise DataError(f"data.weights has {len(cfg.weights)} values but data.paths has {len(cfg.paths)} "
                            f"prefixes; give one weight per path (or none: by token count)")
        bad = [w for w in cfg.weights if not (float(w) > 0 and np.isfinite(float(w)))]
        if bad:
            raise DataError(f"data.weights must be positive finite numbers, got {bad[0]}")
        if cfg.weights and not np.isfinite(sum(float(w) for w in cfg.weights)):
            raise DataError(f"data.weights {list(cfg.weights)} sum to infinity; scale them down (only their "
                            f"ratios matter)")
    elif cfg.paths or cfg.weights:
        raise DataError(f"data.paths / data.weights are for data=indexed; data.source is {cfg.source!r}")


# ---------------------------------------------------------------------- document sources
def embedded_files(max_bytes: int) -> tuple[Path, list[Path]]:
    """The standard library's text files in a fixed hashed order, up to ``max_bytes``.

    Note: the order hashes each relative path, so the capped corpus mixes many packages
    instead of taking the alphabetically first ones; it is the same on every run of one
    Python installation (and differs only as much as the installations differ).
    """
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in EMBEDDED_SKIP
                             and not (rel_dir == Path(".") and d.startswith("config-")))
        found.extend(rel_dir / f for f in filenames if Path(f).suffix in EMBEDDED_SUFFIXES)
    found.sort(key=lambda rel: hashlib.sha256(rel.as_posix().encode()).hexdigest())
    chosen, total = [], 0
    for rel in found:
        size = (root / rel).stat().st_size
        if 0 < size and total + size <= max_bytes:
            chosen.append(root / rel)
            total += size
    if not chosen:
        raise DataError(f"{root}: no standard-library text found for the embedded corpus "
                        f"(data.max_bytes={max_bytes})")
    return root, chosen


def corpus_files(cfg: DataCfg | dict[str, Any]) -> list[Path]:
    """The input files of a document source (listing only, nothing read)."""
    cfg = as_data_cfg(cfg)
    if cfg.source == "embedded":
        return embedded_files(int(cfg.max_bytes))[1]
    if not str(cfg.source).strip():
        raise DataError("data.source is empty: give data.source=PATH (a file, directory or glob), "
                        "embedded, or data=indexed")
    return list_inputs([str(cfg.source)])


def _cache_key(cfg: DataCfg, tokenizer: Any, files: list[Path]) -> str:
    record = {"source": cfg.source if cfg.source == "embedded" else "files",
              "tokenizer": tokenizer.fingerprint(), "eos": tokenizer.eos_id, "field": cfg.jsonl_field,
              "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_documents(cfg: DataCfg, cache_dir: Path) -> str:
    tok = load_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token)
    files = corpus_files(cfg)
    prefix = cache_dir / _cache_key(cfg, tok, files) / CORPUS_NAME
    prepare([], cfg.tokenizer, prefix, workers=cfg.workers, text_field=cfg.jsonl_field,
            eos_token=cfg.eos_token, bos_token=cfg.bos_token, strict=cfg.source != "embedded",
            progress=False, files=files)
    return str(prefix)


# ---------------------------------------------------------------------- datasets
def _strip(prefix: str) -> str:
    for suffix in (indexed.BIN_SUFFIX, indexed.IDX_SUFFIX, ".json"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def describe(prefix: str, full: bool = False) -> dict[str, Any]:
    """One dataset: its shards (manifest or a plain PREFIX.bin/.idx), counts, tokenizer facts."""
    prefix = str(Path(_strip(str(prefix))).expanduser().resolve())
    manifest = read_manifest(prefix)
    if manifest is not None:
        shards = [str(Path(prefix).parent / name) for name in manifest["shards"]]  # names checked: plain
    elif indexed.idx_path(prefix).is_file() or indexed.bin_path(prefix).is_file():
        shards = [prefix]  # IndexedDataset names the missing half, if any
    else:
        raise DataError(f"{prefix}: no dataset here (need PREFIX.bin + PREFIX.idx, or prepare-data's "
                        f"PREFIX.json); run prepare-data --out {prefix}")
    opened = [indexed.IndexedDataset(s, full=full) for s in shards]
    return {"prefix": prefix, "key": Path(prefix).name, "shards": shards,
            "documents": sum(len(d) for d in opened), "tokens": sum(d.n_tokens for d in opened),
            "dtype": opened[0].dtype.name, "manifest": manifest}


def _vocab_facts(datasets: list[dict[str, Any]], cfg: DataCfg) -> dict[str, Any]:
    """vocab_size / eos_id / ... from the manifests (they must agree), else data.tokenizer's."""
    seen = {}
    for d in datasets:
        m = d["manifest"]
        if m is None:
            continue
        facts = {k: m[k] for k in ("vocab_size", "eos_id", "bos_id", "pad_id", "tokenizer")}
        for prev_prefix, prev in seen.items():
            if (prev["vocab_size"], prev["eos_id"]) != (facts["vocab_size"], facts["eos_id"]):
                raise DataError(f"{d['prefix']}: tokenized with vocabulary {facts['vocab_size']} / EOS "
                                f"{facts['eos_id']}, but {prev_prefix} with {prev['vocab_size']} / "
                                f"{prev['eos_id']}; a blend needs one tokenizer")
        seen[d["prefix"]] = facts
    if seen:
        return next(iter(seen.values()))
    if cfg.vocab_size is not None:
        return {"vocab_size": int(cfg.vocab_size), "eos_id": None, "bos_id": None, "pad_id": None,
                "tokenizer": None}
    tok = load_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token)
    return {"vocab_size": int(tok.vocab_size), "eos_id": int(tok.eos_id),
            "bos_id": None if tok.bos_id is None else int(tok.bos_id),
            "pad_id": None if tok.pad_id is None else int(tok.pad_id), "tokenizer": tok.name}


def distinct(datasets: list[dict[str, Any]], field_name: str) -> None:
    """Each dataset once: the same prefix (or a shard of it) twice would serve every row twice."""
    seen: dict[str, str] = {}
    for d in datasets:
        if d["tokens"] == 0:
            raise DataError(f"{d['prefix']}: holds no tokens (every document is empty); leave it out of "
                            f"{field_name}")
        for shard in d["shards"]:
            if shard in seen:
                raise DataError(f"{field_name}: {d['prefix']} and {seen[shard]} both read {shard}; name each "
                                f"dataset once")
            seen[shard] = d["prefix"]


def _check_ids(d: dict[str, Any], vocab: int) -> None:
    ds = indexed.IndexedDataset(d["shards"][0])
    head = np.asarray(ds.tokens[:VOCAB_SAMPLE_TOKENS])
    if len(head) and (int(head.max()) >= vocab or int(head.min()) < 0):
        bad = int(head.max()) if int(head.max()) >= vocab else int(head.min())
        raise DataError(f"{indexed.bin_path(d['shards'][0])}: token id {bad} is outside the vocabulary "
                        f"0..{vocab - 1} (data.tokenizer, or the dataset's manifest)")


def check_data(cfg: DataCfg | dict[str, Any], usable_vocab: int | None = None,
               model: str = "stage.model") -> None:
    """Every check that needs files, before anything is written or any worker starts:
    inputs exist, the tokenizer loads and fits ``usable_vocab``, first records have the
    field, each .idx matches its .bin, paths and weights agree."""
    cfg = as_data_cfg(cfg)
    validate(cfg)
    if cfg.source == "indexed":
        datasets = [describe(p, full=True) for p in cfg.paths]
        evals = [describe(p, full=True) for p in cfg.eval_paths]
        distinct(datasets, "data.paths")
        distinct(evals, "data.eval_paths")
        facts = _vocab_facts(datasets + evals, cfg)
        for d in datasets + evals:
            _check_ids(d, int(facts["vocab_size"]))
        vocab = int(facts["vocab_size"])
    else:
        files = corpus_files(cfg)
        vocab = load_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token).vocab_size
        if cfg.source != "embedded":
            precheck(files, cfg.jsonl_field)
    if usable_vocab is not None and vocab > usable_vocab:
        raise DataError(f"data.tokenizer has {vocab} tokens but {model} has only {usable_vocab} usable "
                        f"vocabulary rows (valid_vocab_size); use a model with a larger vocabulary")


def prepare_corpus(cfg: DataCfg | dict[str, Any], cache_dir: str | Path, seed: int | None = None,
                   parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prepare (cached) and describe the data of ``cfg``; see the module doc for the result.

    ``parent`` is the parent stage's ``summary.json``: this stage's stream starts where the
    parent's ended (``data_positions`` per dataset, ``data_tokens_end`` in total).
    ``seed`` overrides ``cfg.seed`` (kept for callers that pass it apart).
    """
    cfg = as_data_cfg(cfg)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    validate(cfg)
    cache = Path(cache_dir).expanduser().resolve()
    if cfg.source == "indexed":
        paths, weights = list(cfg.paths), [float(w) for w in cfg.weights]
    else:
        paths, weights = [_prepare_documents(cfg, cache)], []
    datasets = [describe(p) for p in paths]
    evals = [describe(p) for p in cfg.eval_paths]
    distinct(datasets, "data.paths")
    distinct(evals, "data.eval_paths")
    facts = _vocab_facts(datasets + evals, cfg)
    by_fraction = not evals
    seed_ = int(cfg.seed)
    n_tokens, n_docs = {"train": 0, "eval": 0}, {"train": 0, "eval": 0}
    for d in datasets:
        if by_fraction:
            tr, ev = Documents(d["shards"], "train", seed_, cfg.eval_fraction), \
                Documents(d["shards"], "eval", seed_, cfg.eval_fraction)
            if d["documents"] < 2:
                raise DataError(f"{d['prefix']}: {d['documents']} document(s); holding out a fraction needs at "
                                f"least 2 (add documents or give data.eval_paths)")
            n_tokens["train"] += tr.n_tokens
            n_tokens["eval"] += ev.n_tokens
            n_docs["train"] += len(tr)
            n_docs["eval"] += len(ev)
            d["tokens_train"] = tr.n_tokens
        else:
            n_tokens["train"] += d["tokens"]
            n_docs["train"] += d["documents"]
            d["tokens_train"] = d["tokens"]
    for d in evals:
        n_tokens["eval"] += d["tokens"]
        n_docs["eval"] += d["documents"]
    if not weights:
        weights = [float(d["tokens_train"]) for d in datasets]
    total_w = sum(weights)
    for d, w in zip(datasets, weights, strict=True):
        d["weight"] = w / total_w
        del d["manifest"]
    for d in evals:
        del d["manifest"]
    positions = (parent or {}).get("data_positions") or {}
    start = {"tokens": int((parent or {}).get("data_tokens_end") or 0),
             "positions": {d["prefix"]: int(positions.get(d["prefix"], 0)) for d in datasets}}
    return {
        "source": cfg.source,
        "train": datasets,
        "eval": evals,
        "eval_from": "fraction" if by_fraction else "paths",
        "seed": seed_,
        "eval_fraction": float(cfg.eval_fraction) if by_fraction else 0.0,
        **{k: facts[k] for k in ("vocab_size", "eos_id", "bos_id", "pad_id", "tokenizer")},
        "dtype": datasets[0]["dtype"],
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "paths": {"train": str(indexed.bin_path(datasets[0]["shards"][0])),
                  "eval": str(indexed.bin_path((evals or datasets)[0]["shards"][0]))},
        "start": start,
    }


prepare_stage_data = prepare_corpus
