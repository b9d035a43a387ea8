"""The streaming growth executor behind ``grow apply``.

Scope: a source checkpoint directory (ours or HF Llama) plus a target config and a
:class:`operators.GrowthSpec` → a new checkpoint directory, written shard by shard::

    job = prepare(ApplyRequest(src, target, spec, out))  # all checks; nothing written
    apply_growth(request, workers=4)                     # stage, write, finalise, publish

How it stays bounded, resumable and parallel:

- **Memory.** Target tensors are produced one at a time by ``GrowthPlan.grow_tensor`` and
  streamed into a shard whose header was written first (:mod:`growth.tensor_io`); source
  tensors are read with plain reads, not a memory map. Peak ≈ one source tensor + a few
  fp32 row blocks (the pipeline's pieces in flight and the tensors computed ahead), whatever
  the model size (:func:`peak_memory_estimate`).
- **Determinism.** The shard plan depends only on target shapes, dtype and
  ``--max-shard-size``; every tensor depends only on (seed, name) and its source. Shards
  are therefore byte-identical across runs, worker counts and interruptions.
- **Resume.** Work happens in ``staging_dir(out)``, held by a :class:`CheckpointWriter`
  (an exclusive lock: a second apply to the same OUT is refused while the first lives).
  Each shard is renamed into place when complete and carries the sha256 of its data, so
  after a kill the same command skips the shards that exist whole with a matching digest
  and writes the rest. The manifest beside the staging dir records the request and the
  source's *content* fingerprint; a different request or a changed source starts afresh.
- **Workers.** Work is dealt by bytes (growth.workqueue): whole shards, or tensor-boundary
  parts of big ones, claimed largest first from one queue of ``O_EXCL`` files in the
  staging dir. ``--workers N`` spawns N processes, and under ``torchrun`` each rank
  (RANK / WORLD_SIZE, gloo) claims its share; rank 0 (or the parent) sets up and
  finalises. Across nodes the output must be on a shared filesystem.
- **Writing.** Each shard goes through growth.pipeline (cast ‖ sha256 ‖ write threads, a
  few pieces in flight, fsync before the rename); growth.shardwork is the loop apply
  and ``grow import`` share.
- **Errors.** Input errors are raised by :func:`prepare` before anything is written. An
  OSError (disk full, I/O) or an interrupt keeps the staging dir for a resume; any other
  error removes it. OUT appears only at the final rename.

Note: growth.json's event time is the time of the *first* attempt (kept in the manifest),
or ``SOURCE_DATE_EPOCH`` when set (the reproducible-builds convention), so a resumed run
is byte-identical to the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    append_event,
    check_output_dir,
    open_moments,
    plan_shards,
    shard_file_names,
    torch_dtype,
)
from growth.config import CONFIG_NAME, ModelConfig, resolve_config
from growth.pipeline import CHUNK, DEPTH
from growth.shardwork import ShardTask, ShardWorker, StagedJob, complete_shards, write_items
from growth.tensor_io import TensorSource, nbytes_of
from operators import GrowthPlan, GrowthSpec, make_plan
from operators.plan import CHUNK_ELEMENTS

GROW_EVENT = "grow"
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRODUCERS = ShardWorker.producers  # threads computing single-block tensors ahead of the writer
LOOKAHEAD = ShardWorker.lookahead  # tensors computed ahead of the one being written
BASE_RSS = 300 * 1024**2  # python + torch + operators: 233 MB measured on a tiny apply


@dataclass(frozen=True)
class ApplyRequest:
    """Everything a worker needs to rebuild the job: plain, picklable values."""

    src: str
    target: str  # flavor name, config.json or checkpoint dir
    spec: dict[str, Any]
    out: str
    dtype: str | None = None  # None: the source's dtype (it must have exactly one)
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    optimizer_state: bool = True  # grow SRC/optimizer/ moments too, when present


@dataclass
class ApplyJob(StagedJob):
    request: ApplyRequest
    reader: CheckpointReader
    plan: GrowthPlan
    dtype: torch.dtype
    tasks: list[ShardTask]
    moments: dict[str, CheckpointReader] = field(default_factory=dict)

    def worker(self, log: Callable[[str], None] | None = None) -> ShardWriter:
        return ShardWriter(self, log)

    def open_staging(self) -> CheckpointWriter:
        return open_staging(self)


# ---------------------------------------------------------------------- preparation
def output_dtype(reader: CheckpointReader, requested: str | None) -> torch.dtype:
    """The dtype grown weights are written in: ``requested``, else the source's one dtype.

    Note: a source with mixed dtypes is refused unless ``--dtype`` says what to write —
    silently picking one would change some tensors' precision behind the user's back.
    """
    if requested is not None:
        dtype = torch_dtype(requested)
        if dtype not in OUTPUT_DTYPES:
            raise CheckpointError(f"--dtype {requested}: use float32, bfloat16 or float16")
        return dtype
    names = list(reader.weight_map)
    first = names[0]
    for name in names[1:]:
        if reader.dtype(name) != reader.dtype(first):
            raise CheckpointError(
                f"{reader.directory / reader.weight_map[name]}: tensor '{name}' is "
                f"{_dtype_name(reader.dtype(name))} but '{first}' is {_dtype_name(reader.dtype(first))}; "
                f"mixed dtypes: pass --dtype to choose the output dtype")
    dtype = reader.dtype(first)
    if dtype not in OUTPUT_DTYPES:
        raise CheckpointError(f"{reader.directory / reader.weight_map[first]}: stored dtype "
                              f"{_dtype_name(dtype)} is not written by grow; pass --dtype float32")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shard_tasks(config: ModelConfig, dtype: torch.dtype, max_shard_size: int, root: str = "",
                kind: str = "weight") -> list[ShardTask]:
    """The deterministic shard plan of ``config`` in ``dtype``: names, shapes, file names."""
    shapes = config.tensor_shapes()
    groups = plan_shards(((n, nbytes_of(s, dtype)) for n, s in shapes.items()), max_shard_size)
    return [ShardTask(root + fname, [(n, shapes[n], dtype) for n in names], kind)
            for fname, names in zip(shard_file_names(len(groups)), groups, strict=True)]


def prepare(request: ApplyRequest, check_out: bool = True) -> ApplyJob:
    """Open and check the source, plan the growth and the shards. Writes nothing.

    Raises CheckpointError / ConfigError / GrowthError with a one-line message naming the
    file, tensor or field, before any byte is written.
    """
    if check_out:
        check_output_dir(Path(request.out))
    if request.max_shard_size <= 0:
        raise CheckpointError(f"--max-shard-size must be positive, got {request.max_shard_size}")
    src = Path(request.src)
    reader = CheckpointReader(src)
    dtype = output_dtype(reader, request.dtype)
    target = resolve_config(request.target)
    with TensorSource(reader) as source:  # weights are read only for positions="distance"
        plan = make_plan(reader.config, target, GrowthSpec.from_dict(dict(request.spec)),
                         get_tensor=source.get)
    moments = open_moments(src, reader.config) if request.optimizer_state else {}
    tasks = shard_tasks(plan.config, dtype, request.max_shard_size)
    for kind in moments:
        tasks += shard_tasks(plan.config, torch.float32, request.max_shard_size,
                             f"{OPTIMIZER_DIR}/{kind}/", kind)
    return ApplyJob(request, reader, plan, dtype, tasks, moments)


# ---------------------------------------------------------------------- shard writing
class ShardWriter(ShardWorker):
    """Produces the grown tensors of one job's shards (one instance per worker).

    Note: the tensors that fit one row block are computed up to ``LOOKAHEAD`` ahead in a
    small thread pool (random-init fields are seeded per row block and drawn independently,
    so several are drawn at once on several cores); bigger ones stream block by block in the
    caller's thread. Source reads are serialised by a lock (the reader's files are shared).
    A tensor the plan copies unchanged whose source already has the output dtype is passed
    through in that dtype (no fp32 round trip).
    """

    def __init__(self, job: ApplyJob, log: Callable[[str], None] | None = None):
        super().__init__()
        self.job = job
        self.log = log
        self.sources = {"weight": TensorSource(job.reader),
                        **{k: TensorSource(r) for k, r in job.moments.items()}}
        self.ops = {op.name: op for op in job.plan.tensor_ops()}
        self.read_lock = threading.Lock()

    def _get(self, kind: str) -> Callable[[str], torch.Tensor]:
        source = self.sources[kind]

        def get(name: str) -> torch.Tensor:
            with self.read_lock:
                return source.get(name)
        return get

    def tensor(self, name: str, kind: str, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """The grown tensor as row blocks: fp32 (the shard writer casts them while writing),
        or already in ``dtype`` when the plan copies it unchanged from a source in ``dtype``.
        The source is read once, in its own dtype; each block is upcast on its own."""
        op = self.ops[name]
        if self.log is not None:
            src = f"{op.src_name} {list(op.src_shape)}" if op.src_name else "(new)"
            self.log(f"{kind:<10} {name} {list(op.shape)} <- {src}: {op.operator}")
        if (op.operator == "copy" and op.src_name and tuple(op.src_shape) == tuple(op.shape)
                and self.sources[kind].reader.dtype(op.src_name) == dtype):
            return self._passthrough(op.src_name, op.shape, kind)
        return self.job.plan.grow_tensor_chunks(name, self._get(kind), kind=kind)

    def _passthrough(self, src_name: str, shape: tuple[int, ...], kind: str) -> Iterator[torch.Tensor]:
        src = self._get(kind)(src_name)
        for r0, r1 in GrowthPlan.row_blocks(tuple(shape), CHUNK_ELEMENTS):
            yield src[r0:r1] if src.dim() else src

    def label(self, name: str, kind: str) -> str:
        """How errors name a target tensor: with the source tensor it is grown from."""
        what = "tensor" if kind == "weight" else f"{kind} of"
        src = self.ops[name].src_name
        origin = f" (grown from '{src}' in {self.sources[kind].directory})" if src else " (new)"
        return f"{what} '{name}'{origin}"

    def blame(self, task: ShardTask) -> None:
        """A non-finite output whose source already holds NaN/inf is the source's fault:
        say so, naming the source file and tensor."""
        source = self.sources[task.kind]
        for name, _, _ in task.entries:
            src = self.ops[name].src_name
            if src and not all(torch.isfinite(c).all() for c in source.chunks(src)):
                stored, fname = source.locate(src)
                raise CheckpointError(f"{source.directory / fname}: source tensor '{stored}' holds NaN "
                                      f"or inf; fix or replace the source checkpoint") from None

    def close(self) -> None:
        super().close()
        for s in self.sources.values():
            s.close()


def write_shards(job: ApplyJob, rank: int = 0, world: int = 1,
                 progress: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> int:
    """Write the work items this worker claims (growth.shardwork.write_items: items by
    bytes, largest first, each taken by the first of ``world`` workers to claim it);
    returns how many it wrote. ``rank`` only names the worker."""
    return write_items(job.tasks, job.staging, ShardWriter(job, log), world, progress)


# ---------------------------------------------------------------------- staging
def manifest_key(job: ApplyJob) -> dict[str, Any]:
    """What a resumed staging dir must have been written from: the request, the source's
    content fingerprint and, when moments are grown, theirs and the optimizer state's."""
    r = job.request
    return {"source": str(Path(r.src).resolve()), "source_fingerprint": job.reader.fingerprint(),
            "target_config": job.plan.config.to_hf_dict(), "spec": job.plan.spec.to_dict(),
            "dtype": _dtype_name(job.dtype), "max_shard_size": r.max_shard_size,
            "moments": {kind: reader.fingerprint() for kind, reader in sorted(job.moments.items())},
            "optimizer_state": _sha256(Path(r.src) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME) if job.moments else None}


def open_staging(job: ApplyJob) -> CheckpointWriter:
    """Lock and create or resume the staging dir of ``job.out`` (keyed by the request and
    the source's content fingerprint)."""
    return CheckpointWriter(job.out, key=manifest_key(job))


def finalize(job: ApplyJob, writer: CheckpointWriter) -> Path:
    """Check every shard, write indexes, config, history, optimizer state and the
    release's files; publish."""
    staging = writer.staging
    complete_shards(job.tasks, staging)
    roots = {"weight": ""} | {k: f"{OPTIMIZER_DIR}/{k}/" for k in job.moments}
    for kind, root in roots.items():
        tasks = [t for t in job.tasks if t.kind == kind]
        weight_map = {n: Path(t.path).name for t in tasks for n, _, _ in t.entries}
        writer.write_index(root, weight_map, sum(t.nbytes for t in tasks))
    if job.moments:
        writer.copy_optimizer_state(job.request.src)
    writer.write_config(job.plan.config, raw=job.reader.raw_config, dtype=job.dtype)
    carried = writer.carry(job.request.src)
    writer.write_history(append_event(job.reader.history, grow_event(job, writer.manifest, carried)))
    return writer.publish()


def grow_event(job: ApplyJob, manifest: dict[str, Any], carried: list[str]) -> dict[str, Any]:
    event = job.plan.event()
    event.update({
        "kind": GROW_EVENT, "time": manifest["time"], "seed": job.plan.spec.seed,
        "dtype": _dtype_name(job.dtype), "optimizer_state": bool(job.moments), "carried": carried,
        "parent": {"path": str(Path(job.request.src).resolve()),
                   "fingerprint": manifest["key"]["source_fingerprint"],
                   "config_sha256": _sha256(Path(job.request.src) / CONFIG_NAME)},
    })
    return event


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- estimates
def peak_memory_estimate(plan: GrowthPlan, src_dtype: torch.dtype, dtype: torch.dtype,
                         workers: int = 1) -> int:
    """Bytes of RAM ``grow apply`` needs, per worker: BASE_RSS; the worst tensor's source in
    its own dtype plus the block being computed from it (grow_tensor_chunks: at most
    CHUNK_ELEMENTS fp32 elements, a gathered block and its column gather); the pieces the
    pipeline holds (up to DEPTH in flight and LOOKAHEAD single-block tensors computed
    ahead, each at most one block) with the sources of the PRODUCERS pool's tensors; and
    the reused cast buffers (DEPTH + 1 chunks of ``dtype``)."""
    block = nbytes_of((CHUNK_ELEMENTS,), torch.float32)
    ops = plan.tensor_ops()

    def cost(op: Any) -> int:
        src = nbytes_of(op.src_shape, src_dtype) if op.src_name else 0
        return src + min(nbytes_of(op.shape, torch.float32), 2 * block)
    piece = min(block, max(nbytes_of(op.shape, torch.float32) for op in ops))
    ahead = (DEPTH + LOOKAHEAD) * piece + PRODUCERS * min(block, max(
        nbytes_of(op.src_shape, src_dtype) for op in ops if op.src_name) if any(o.src_name for o in ops) else 0)
    casts = (DEPTH + 1) * nbytes_of((CHUNK,), dtype) if dtype != torch.float32 else 0
    return workers * (BASE_RSS + max(cost(op) for op in ops) + ahead + casts)
