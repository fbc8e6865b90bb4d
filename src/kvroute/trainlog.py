"""Moved: metrics to :mod:`kvroute.train.log`, checkpoints to :mod:`kvroute.train.checkpoint`.

This alias stays for one release; import from the new homes.
"""

from kvroute.train.checkpoint import (  # noqa: F401
    STATE_DIR,
    commit_training_state,
    latest_checkpoint,
    load_training_state,
    remove_partial_checkpoints,
    save_training_state,
    stage_training_state,
    staging_dir,
)
from kvroute.train.log import EVAL_COLUMNS, TRAIN_COLUMNS, MetricsLog, read_metrics  # noqa: F401
