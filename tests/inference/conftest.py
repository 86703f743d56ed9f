"""A tiny fine-tuned run the inference tests share: FT1 on the session's synthetic shards, trained in
this process as a 1-rank DeepSpeed job (a few seconds), with consolidated weights at every checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import single_process_rank  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    # the codec's batch numerics depend on the thread count too: the shards were written with 1 thread
    yield


@pytest.fixture(scope="session")
def tiny_run(prepared_shards, tmp_path_factory) -> Path:
    from af_train.config import Recipe
    from af_train.engine import Trainer

    run_dir = tmp_path_factory.mktemp("inference") / "run"
    with single_process_rank():
        recipe = Recipe.load(REPO / "recipes" / "tiny_ft1.yaml", [
            f"data.train={prepared_shards / 'train'}", f"data.val={prepared_shards / 'val'}",
            f"data.test={prepared_shards / 'test'}", "data.max_length=80", "objective.init_checkpoint=null",
            f"train.run_dir={run_dir}", "train.max_steps=6", "train.eval_every=2", "train.save_every=2",
            "train.micro_batch_size=4", "train.log_every=2", "train.zero_stage=1", "train.keep_last=3",
            "train.save_weights_every_checkpoint=true", "optim.lr=3e-3",
        ])
        trainer = Trainer(recipe, resume="auto")
        trainer.fit()
        trainer.close()
    return run_dir
