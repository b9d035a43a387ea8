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
           "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer", "TokenBatches"]


class TokenBatches:
    """Compatibility view for callers that ask per (step, micro, rank, world) with grad_accum 1.

    Note: the order is set by ``data.seed`` (one stream across stages), not by ``seed``,
    which is accepted and ignored; ``batch`` equals the worker's with ``grad_accum`` 1.
    """

    def __init__(self, info, split, seq_len, micro_batch_size, seed=0):
        if split != "train":
            raise DataError(f"TokenBatches serves the train split, got {split!r} (use eval_batches)")
        self.info, self.seq_len, self.mbs = info, seq_len, micro_batch_size
        self._streams = {}

    def batch(self, step, micro=0, dp_rank=0, dp_world=1):
        key = (dp_rank, dp_world)
        if key not in self._streams:
            self._streams[key] = TrainStream(self.info, self.seq_len, self.mbs, 1, dp_world, dp_rank)
        if micro:
            raise DataError("TokenBatches is the grad_accum 1 view; use TrainStream for micro steps > 0")
        return self._streams[key].batch(step, 0)
