"""HF-layout checkpoints: one reader, one streaming writer.

Modules: :mod:`.format` (names, sizes, dtypes, growth.json history, config.json),
:mod:`.reader` (:class:`CheckpointReader`, the optimizer/ readers), :mod:`.writer`
(:class:`CheckpointWriter`, output-dir checks, locks, shard plans). Import from this package.

Layout (the transformers convention, so ``from_pretrained`` reads our directories)::

    DIR/config.json                          the release's own dict, sizes updated
    DIR/model.safetensors                    one shard, or
    DIR/model-00001-of-0000N.safetensors …   N shards, with
    DIR/model.safetensors.index.json         {"metadata": {"total_size", "sha256"}, "weight_map"}
    DIR/growth.json                          history: format version, events, parents
    DIR/optimizer/exp_avg/, exp_avg_sq/      Adam moments (weight-less layouts, HF names, fp32)
    DIR/optimizer/state.json                 {"step", "betas", "eps", "weight_decay"}
    DIR/tokenizer.model, *.py, …             release files carried along (CARRIED_NAMES)

:class:`CheckpointReader` parses and validates headers (strictly, see
:mod:`growth.tensor_io`), confines shard names to the directory, and reads one tensor at
a time with exact plain reads. :class:`CheckpointWriter` is the only way a checkpoint is
written (init, apply, import, export-hf, a stage's final export): an exclusive staging
dir guarded by a lock file, header-first streaming shards each carrying the sha256 of its
data, an index with those digests, config, history, carried files, and an atomic rename
into place. :meth:`CheckpointReader.fingerprint` is built from the digests, so it changes
whenever any tensor byte does.
Pickle weights (``*.bin``, ``*.pt``) are never unpickled here; ``grow import`` reads them
with ``torch.load(weights_only=True)`` (:mod:`growth.importer`).
"""

from growth.checkpoint.format import (  # noqa: F401
    ADDED_ONLY_IF_NEW,
    CARRIED_NAMES,
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    DTYPES,
    FORMAT_VERSION,
    HISTORY_NAME,
    IGNORED_SUFFIXES,
    INDEX_NAME,
    KEEP_RELEASE_KEYS,
    LOCK_SUFFIX,
    MANIFEST_SUFFIX,
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    PICKLE_SUFFIXES,
    SHARD_NAME,
    WEIGHTS_NAME,
    append_event,
    carried_files,
    config_dict,
    confined,
    new_history,
    parent_fingerprint,
    parse_size,
    read_history,
    torch_dtype,
)
from growth.checkpoint.reader import (  # noqa: F401
    CheckpointReader,
    _refuse_pickles,
    load_model,
    open_moments,
    read_optimizer_state,
)
from growth.checkpoint.writer import (  # noqa: F401
    CheckpointWriter,
    DirLock,
    Entry,
    check_output_dir,
    event_time,
    lock_path,
    manifest_path,
    plan_entries,
    plan_shards,
    save_checkpoint,
    shard_file_names,
    staging_dir,
    write_json,
)
from growth.tensor_io import CheckpointError  # noqa: F401
