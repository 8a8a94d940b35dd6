"""Pieces of the PPO run that need no services."""

from __future__ import annotations

import json

from services.orchestrator.run import keep_steps_up_to


def test_a_resume_keeps_one_row_per_step(tmp_path):
    rows = [{"step": s, "reward_mean": s / 10} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')
    (tmp_path / "validation.jsonl").write_text('{"step": 2, "val_reward_mean": 0.5}\n{"step": 4, "val_reward_mean": 0.6}\n')
    keep_steps_up_to(tmp_path, 2)  # resumed from the step-2 checkpoint: steps 3-4 (and a torn 5) go
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:2]
    assert [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()] == [2]
    keep_steps_up_to(tmp_path / "missing", 2)  # a run directory without logs yet: nothing to do
