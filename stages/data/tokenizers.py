"""Tokenizers: byte-level, HF ``tokenizer.json``, SentencePiece ``tokenizer.model``.

``load_tokenizer(spec)`` takes ``byte``, one of those files, or a directory holding one
(a checkpoint directory, as the Tele-FLM release ships ``tokenizer.model`` next to the
weights). Every tokenizer has ``encode(text) -> ids``, ``decode``, ``vocab_size``,
``eos_id``, ``bos_id``, ``pad_id``, ``name`` and ``fingerprint()`` (what cache keys hash).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.errors import DataError

HF_NAME, SP_NAME = "tokenizer.json", "tokenizer.model"
# Names HF tokenizers give their end/begin-of-document tokens, tried in order.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD: lossless, no vocabulary file."""

    name = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class HFTokenizer:
    """An HF ``tokenizers`` ``tokenizer.json``; EOS/BOS found by name unless given."""

    def __init__(self, path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        self.path = Path(path).resolve()
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{self.path}: a tokenizer.json needs the 'tokenizers' package "
                            f"(pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"{self.path}: not a tokenizers tokenizer.json ({str(err).splitlines()[0]})") from None
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special(eos_token, EOS_CANDIDATES, "eos_token")
        if self.eos_id is None:
            raise DataError(f"{self.path}: no end-of-document token among {', '.join(EOS_CANDIDATES)};"
                            f" set data.eos_token (prepare-data --eos-token)")
        self.bos_id = self._special(bos_token, BOS_CANDIDATES, "bos_token")
        self.pad_id = self._tok.token_to_id("<pad>")

    def _special(self, given: str | None, candidates: tuple[str, ...], field: str) -> int | None:
        if given is not None:
            tid = self._tok.token_to_id(given)
            if tid is None:
                raise DataError(f"{self.path}: data.{field} {given!r} is not in the vocabulary")
            return tid
        for name in candidates:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def fingerprint(self) -> str:
        return _file_digest(self.path)


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (Llama / Tele-FLM style); EOS from the model."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        try:
            import sentencepiece as spm
        except ImportError:
            raise DataError(f"{self.path}: a tokenizer.model needs the 'sentencepiece' package "
                            f"(pip install sentencepiece)") from None
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"{self.path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
        self.name = str(self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(f"{self.path}: the SentencePiece model has no EOS piece (train it with eos_id >= 0)")
        bos, pad = int(self._sp.bos_id()), int(self._sp.pad_id())
        self.bos_id = bos if bos >= 0 else None
        self.pad_id = pad if pad >= 0 else None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def fingerprint(self) -> str:
        return _file_digest(self.path)


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def tokenizer_file(spec: str | Path) -> Path | None:
    """The tokenizer file ``spec`` names (None for ``byte``); DataError if there is none."""
    if str(spec) == "byte":
        return None
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        for name in (SP_NAME, HF_NAME):  # Tele-FLM ships tokenizer.model; prefer it when both exist
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: directory holds no {SP_NAME} or {HF_NAME} (data.tokenizer / --tokenizer)")
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (give byte, a {HF_NAME}, a {SP_NAME} "
                        f"or a checkpoint directory holding one)")
    if path.suffix not in (".json", ".model"):
        raise DataError(f"{path}: unknown tokenizer file type {path.suffix or '(none)'!r}; "
                        f"expected a {HF_NAME} or a SentencePiece {SP_NAME}")
    return path


def load_tokenizer(spec: str | Path = "byte", eos_token: str | None = None,
                   bos_token: str | None = None) -> Tokenizer:
    path = tokenizer_file(spec or "byte")
    if path is None:
        return ByteTokenizer()
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path, eos_token, bos_token)
