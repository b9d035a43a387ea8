"""Tokens for a stage: documents → Megatron indexed datasets → one stream across stages.

    tokenizers   byte-level, HF tokenizer.json, SentencePiece tokenizer.model
    indexed      Megatron-LM's MMIDIDX v1 reader/writer (.bin + .idx)
    sources      input documents (text, jsonl[.gz|.zst], parquet), streamed
    prepare      prepare-data: documents → datasets, N workers, resumable (a CLI)
    stream       per-epoch document order, blends, a stage's batches, eval batches
    stage        the data config group, cached preparation, checks, the resolved info
"""

from stages.data.errors import DataError
from stages.data.stage import (
    DataCfg,
    as_data_cfg,
    check_data,
    corpus_files,
    embedded_files,
    prepare_corpus,
    prepare_stage_data,
)
from stages.data.stream import TrainStream, eval_batches
from stages.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = ["DataError", "DataCfg", "as_data_cfg", "check_data", "corpus_files", "embedded_files",
           "prepare_corpus", "prepare_stage_data", "TrainStream", "eval_batches", "ByteTokenizer",
           "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer"]

