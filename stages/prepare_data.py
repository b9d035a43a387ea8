"""``prepare-data``: the command line of :mod:`stages.data.prepare` (see its docstring).

    prepare-data INPUT... --tokenizer byte|FILE|CHECKPOINT_DIR --out PREFIX [--workers N]
                 [--shard-size SIZE] [--field text]
    python -m stages.prepare_data ...   (the same, without the console script)
"""

from __future__ import annotations

import argparse
import logging
import sys

from stages.data.errors import DataError
from stages.data.prepare import parse_size, prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare-data",
        description="Tokenize documents into a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx, "
                    "MMIDIDX v1), every document followed by EOS. Re-running an interrupted job finishes "
                    "it; re-running a finished one does nothing.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files (one file = one document), .jsonl/.jsonl.gz/.jsonl.zst (one line = one "
                        "document), .parquet (one row = one document), directories or globs")
    p.add_argument("--tokenizer", default="byte",
                   help="byte (UTF-8 bytes, EOS 257, vocabulary 259), an HF tokenizer.json, a SentencePiece "
                        "tokenizer.model, or a checkpoint directory holding one (default: byte)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix: writes PREFIX.bin, "
                   "PREFIX.idx and the manifest PREFIX.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--shard-size", default="4GB",
                   help="largest .bin per shard (e.g. 512MB); bigger outputs become PREFIX-00000-of-0000N")
    p.add_argument("--field", default="text", help="jsonl field / parquet column holding the text (default text)")
    p.add_argument("--eos-token", default=None, help="tokenizer.json only: the end-of-document token "
                   "(default: found by name, </s>, <|endoftext|>, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.workers < 1:
            raise DataError(f"--workers must be >= 1, got {args.workers}")
        m = prepare(args.inputs, args.tokenizer, args.out, args.workers, parse_size(args.shard_size),
                    args.field, args.eos_token, progress=not args.quiet)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to finish", file=sys.stderr)
        return 130
    print(f"{args.out}: {m['documents']} documents, {m['tokens']} tokens in {len(m['shards'])} shard(s) "
          f"({m['dtype']}, vocabulary {m['vocab_size']}, EOS {m['eos_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
