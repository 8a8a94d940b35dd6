"""Pieces of the PPO run that need no services."""

from __future__ import annotations

import json

from common.config import ExpManagerConfig
from trainer.loop import MetricsLog


def test_a_resume_keeps_one_row_per_step(tmp_path):
    rows = [{"step": s, "reward_mean": s / 10} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')
    (tmp_path / "validation.jsonl").write_text('{"step": 2, "val_reward_mean": 0.5}\n{"step": 4, "val_reward_mean": 0.6}\n')
    exp = ExpManagerConfig(create_tensorboard_logger=False, create_wandb_logger=False)
    # Resumed from the step-2 checkpoint: steps 3-4 (and a torn 5) go; step 3 is logged once again.
    log = MetricsLog(tmp_path, exp, {}, resume_step=2, enabled=True)
    log.log("metrics", 3, {"reward_mean": 0.33})
    log.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        *rows[:2], {"step": 3, "reward_mean": 0.33}]  # fmt: skip
    assert [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()] == [2]
