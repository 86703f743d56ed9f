"""Training checkpoints: ``files`` (layout, naming, finding, verification, metadata, consolidation,
retention; one process, no DeepSpeed at import), ``state`` (progress counters, RNG state) and
``manager`` (``CheckpointManager``, the Trainer's component: resume, load, save, the best checkpoint).

The names most callers need are importable from the package itself.
"""

from af_train.checkpoint.files import (
    BEST,
    BEST_RECORD,
    LATEST,
    MARKER,
    META,
    CheckpointError,
    complete_checkpoints,
    consolidated_state,
    convert_to_universal,
    is_complete,
    latest_complete,
    load_allowing_deepspeed,
    newest_intact,
    read_best,
    read_meta,
    resolve_resume,
    step_of,
    tag_for,
    verify,
)
from af_train.checkpoint.manager import CheckpointManager, ResumePoint
from af_train.checkpoint.state import Progress, rng_state, seed_everything, set_rng_state

__all__ = [
    "BEST", "BEST_RECORD", "LATEST", "MARKER", "META", "CheckpointError", "CheckpointManager", "Progress",
    "ResumePoint", "complete_checkpoints", "consolidated_state", "load_allowing_deepspeed", "convert_to_universal",
    "is_complete", "latest_complete",
    "newest_intact", "read_best", "read_meta", "resolve_resume", "rng_state", "seed_everything", "set_rng_state",
    "step_of", "tag_for", "verify",
]
