"""The token stream of a stage: per-epoch document permutations, blends, batches.

Each dataset of a blend is read as one endless stream: epoch e is its training documents
in a permutation seeded by (data.seed, the dataset's name, e), back to back (every
document ends with EOS). A sample of length L is the L + 1 tokens at a stream position
(x = the first L, y = the last L); consecutive samples of a dataset start L tokens apart,
so within an epoch no token is read twice and no sample repeats. Where a stage starts is
a token position per dataset (``start.positions``), which is how a grown stage continues
its parent's stream even with another ``seq_len`` or batch size.

A blend assigns the stage's samples to datasets by merging per-dataset "event times"
(i + ½) / wₖ, ties to the lower index (the same deterministic interleaving as Megatron's
``BlendedDataset``: after n samples dataset k has round(n·wₖ) ± 1), computed block by
block from the stage's start. Every batch is a pure function of (start positions, step,
micro step, rank): a resumed stage replays exactly the samples of an uninterrupted one.

Note: unlike Megatron's GPTDataset, samples are not shuffled across the epoch after the
document permutation: a shuffled sample index exists only for one sequence length from
the start of epoch 0, while here a stage may start at any token with any ``seq_len``.
Rows of one batch are therefore neighbouring windows of the permuted document stream.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.data import indexed
from stages.data.errors import DataError

if TYPE_CHECKING:
    import torch

BLOCK = 4096  # blend samples assigned per merge


def eval_mask(n_docs: int, seed: int, fraction: float) -> np.ndarray:
    """Held-out documents by a hash of (seed, document index); both sides non-empty when n ≥ 2."""
    x = np.arange(n_docs, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
    with np.errstate(over="ignore"):  # splitmix64
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    mask = (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction
    if n_docs >= 2 and not mask.any():
        mask[-1] = True
    if n_docs >= 2 and mask.all():
        mask[0] = False
    return mask


class Documents:
    """The documents of one dataset (all its shards), or a subset of them, as one table."""

    def __init__(self, shards: list[str], select: str = "all", seed: int = 0, fraction: float = 0.0):
        self.shards = [indexed.IndexedDataset(p) for p in shards]
        starts, lengths, owner = [], [], []
        for s, ds in enumerate(self.shards):
            starts.append(ds.starts())
            lengths.append(np.asarray(ds.lengths, dtype=np.int64))
            owner.append(np.full(len(ds), s, dtype=np.int32))
        self.start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.owner = np.concatenate(owner) if owner else np.zeros(0, np.int32)
        if select != "all":
            held = eval_mask(len(self.length), seed, fraction)
            keep = np.flatnonzero(held if select == "eval" else ~held)
            self.start, self.length, self.owner = self.start[keep], self.length[keep], self.owner[keep]
        self.n_tokens = int(self.length.sum())

    def __len__(self) -> int:
        return len(self.length)

    def read(self, doc: int, offset: int, n: int) -> np.ndarray:
        a = int(self.start[doc]) + offset
        return self.shards[int(self.owner[doc])].tokens[a:a + n]


class DocStream:
    """Endless concatenation of epochs of ``docs``; epoch e in permutation (seed, key, e),
    or in stored order when ``shuffle`` is false (the eval stream)."""

    def __init__(self, docs: Documents, seed: int, key: str, shuffle: bool = True):
        if docs.n_tokens == 0:
            raise DataError(f"{docs.shards[0].prefix if docs.shards else key}: no tokens in this split")
        self.docs, self.seed, self.shuffle = docs, seed, shuffle
        self.key = zlib.crc32(key.encode())
        self.epoch_tokens = docs.n_tokens
        self._epoch = lru_cache(maxsize=2)(self._make_epoch)

    def _make_epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.docs)
        order = np.random.default_rng([self.seed, self.key, e]).permutation(n) if self.shuffle \
            else np.arange(n)
        return order, np.cumsum(self.docs.length[order])

    def window(self, pos: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            e, o = divmod(pos + filled, self.epoch_tokens)
            order, ends = self._epoch(e)
            j = int(np.searchsorted(ends, o, side="right"))
            doc = int(order[j])
            off = o - (int(ends[j]) - int(self.docs.length[doc]))
            take = min(n - filled, int(self.docs.length[doc]) - off)
            out[filled:filled + take] = self.docs.read(doc, off, take)
            filled += take
        return out


def blend_counts(weights: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The next ``n`` samples' datasets after ``counts`` samples each; (labels, new counts)."""
    K = len(weights)
    cand_k, cand_t = [], []
    for k in range(K):
        c = min(n, int(np.ceil((n + K) * weights[k])) + 2)
        i = np.arange(counts[k], counts[k] + c, dtype=np.float64)
        cand_k.append(np.full(c, k, dtype=np.int64))
        cand_t.append((i + 0.5) / weights[k])
    ks, ts = np.concatenate(cand_k), np.concatenate(cand_t)
    labels = ks[np.lexsort((ks, ts))[:n]]
    return labels, counts + np.bincount(labels, minlength=K)


class Blend:
    """Sample j of a stage → (dataset k, its i-th sample in this stage), block by block."""

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._starts = [np.zeros(len(w), dtype=np.int64)]  # counts at each block start
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self._starts) <= b:
            i = len(self._starts) - 1
            _, after = blend_counts(self.weights, self._starts[i], BLOCK)
            self._starts.append(after)
        if b not in self._blocks:
            if len(self._blocks) > 4:
                self._blocks.clear()
            labels, _ = blend_counts(self.weights, self._starts[b], BLOCK)
            within = np.empty(BLOCK, dtype=np.int64)
            for k in range(len(self.weights)):
                hit = labels == k
                within[hit] = self._starts[b][k] + np.arange(int(hit.sum()))
            self._blocks[b] = (labels, within)
        return self._blocks[b]

    def lookup(self, j0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels, within = np.empty(n, np.int64), np.empty(n, np.int64)
        done = 0
        while done < n:
            b, o = divmod(j0 + done, BLOCK)
            take = min(n - done, BLOCK - o)
            lab, wit = self._block(b)
            labels[done:done + take], within[done:done + take] = lab[o:o + take], wit[o:o + take]
            done += take
        return labels, within

    def counts(self, n: int) -> np.ndarray:
        """Samples per dataset among the stage's first ``n``."""
        b, o = divmod(n, BLOCK)
        labels, _ = self._block(b)
        return self._starts[b] + np.bincount(labels[:o], minlength=len(self.weights))


def _pair(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: prepare-data and its workers never need torch

    chunk = torch.from_numpy(np.stack(rows))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class TrainStream:
    """The training batches of one stage on one data-parallel rank.

    ``info`` is what the orchestrator resolved (``stages.data.stage.prepare_stage_data``):
    datasets with weights and the start position of each. A step's global batch is
    ``micro_batch_size × grad_accum × dp_world`` samples of ``seq_len``; sample j of the
    stage is micro step m = (j // (mbs·world)) % accum of step j // G on rank
    (j // mbs) % world.
    """

    def __init__(self, info: dict[str, Any], seq_len: int, micro_batch_size: int, grad_accum: int = 1,
                 dp_world: int = 1, dp_rank: int = 0):
        if seq_len < 1 or micro_batch_size < 1 or grad_accum < 1 or not 0 <= dp_rank < dp_world:
            raise DataError(f"bad stream shape seq_len={seq_len} micro_batch_size={micro_batch_size} "
                            f"grad_accum={grad_accum} rank={dp_rank}/{dp_world}")
        self.info, self.seq_len, self.mbs, self.accum = info, seq_len, micro_batch_size, grad_accum
        self.world, self.rank = dp_world, dp_rank
        seed, fraction = int(info["seed"]), float(info.get("eval_fraction") or 0.0)
        select = "train" if info.get("eval_from") == "fraction" else "all"
        self.names = [d["prefix"] for d in info["train"]]
        self.streams = [DocStream(Documents(d["shards"], select, seed, fraction), seed, d["key"])
                        for d in info["train"]]
        for name, s in zip(self.names, self.streams, strict=True):
            if s.epoch_tokens < seq_len + 1:
                raise DataError(f"{name}: {s.epoch_tokens} training tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}; use more data or a shorter stage.seq_len")
        positions = info.get("start", {}).get("positions", {})
        self.start = np.asarray([int(positions.get(n, 0)) for n in self.names], dtype=np.int64)
        self.tokens_start = int(info.get("start", {}).get("tokens", 0))
        self.blend = Blend([float(d["weight"]) for d in info["train"]]) if len(self.streams) > 1 else None

    @property
    def global_batch(self) -> int:
        return self.mbs * self.accum * self.world

    def _samples(self, j0: int, n: int) -> list[np.ndarray]:
        if self.blend is None:
            labels, within = np.zeros(n, np.int64), np.arange(j0, j0 + n, dtype=np.int64)
        else:
            labels, within = self.blend.lookup(j0, n)
        L = self.seq_len
        return [self.streams[k].window(int(self.start[k]) + int(i) * L, L + 1)
                for k, i in zip(labels.tolist(), within.tolist(), strict=True)]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [mbs, seq_len] of this rank at (step, micro); y = x shifted by one."""
        if step < 0 or not 0 <= micro < self.accum:
            raise DataError(f"bad batch coordinates step={step} micro={micro}")
        j0 = step * self.global_batch + (micro * self.world + self.rank) * self.mbs
        return _pair(self._samples(j0, self.mbs))

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro batches of optimizer step ``step`` (the worker's one call)."""
        return [self.batch(step, m) for m in range(self.accum)]

    def position(self, steps: int) -> dict[str, Any]:
        """Where the stream stands after ``steps`` optimizer steps of this stage (summary fields)."""
        n = steps * self.global_batch
        counts = np.asarray([n]) if self.blend is None else self.blend.counts(n)
        end = self.start + counts * self.seq_len
        epochs = [int(p // s.epoch_tokens) for p, s in zip(end.tolist(), self.streams, strict=True)]
        return {
            "data_tokens_start": self.tokens_start,
            "data_tokens_end": self.tokens_start + n * self.seq_len,
            "data_epoch": max(epochs),
            "data_positions": dict(zip(self.names, (int(p) for p in end), strict=True)),
            "data_epochs": dict(zip(self.names, epochs, strict=True)),
        }


def eval_batches(info: dict[str, Any], seq_len: int, micro_batch_size: int,
                 n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed held-out batches: windows spread evenly over the eval documents in order.

    No seed and no rank: every stage and every rank sees the same batches, which is what
    makes a stage's ``eval_loss_start`` comparable with its parent's ``eval_loss_end``.
    """
    seed, fraction = int(info["seed"]), float(info.get("eval_fraction") or 0.0)
    if info.get("eval_from") == "fraction":
        docs = [Documents(d["shards"], "eval", seed, fraction) for d in info["train"]]
    else:
        docs = [Documents(d["shards"]) for d in info["eval"]]
    streams = [DocStream(d, seed, "eval", shuffle=False) for d in docs if d.n_tokens]
    total = sum(s.epoch_tokens for s in streams)
    if total < seq_len + 1:
        raise DataError(f"the eval split has {total} tokens, fewer than seq_len + 1 = {seq_len + 1}; use more "
                        f"data, a larger data.eval_fraction or a shorter stage.seq_len")
    ends = np.cumsum([s.epoch_tokens for s in streams])
    starts = np.linspace(0, total - seq_len - 1, n * micro_batch_size).round().astype(np.int64)
    rows = []
    for p in starts.tolist():
        k = int(np.searchsorted(ends, p, side="right"))
        base = int(ends[k - 1]) if k else 0
        s = streams[k]
        if p - base + seq_len + 1 <= s.epoch_tokens:
            rows.append(s.window(p - base, seq_len + 1))
        else:  # a window crossing into the next eval dataset
            head = s.window(p - base, s.epoch_tokens - (p - base))
            rows.append(np.concatenate([head, streams[k + 1].window(0, seq_len + 1 - len(head))]))
    return [_pair(rows[i * micro_batch_size:(i + 1) * micro_batch_size]) for i in range(n)]
