import math

import pytest
import torch

from common.config import OptimConfig, SchedConfig
from common.errors import InvalidArgument
from trainer.optim import build_optimizer, build_scheduler, clip_gradients, lr_at


def _optim(**sched):
    return OptimConfig(lr=1.0, sched=SchedConfig(**{"warmup_steps": 2, "constant_steps": 1, "min_lr": 0.1, **sched}))


def test_cosine_schedule_by_hand():
    optim = _optim()
    # warm-up: 1/2, 2/2; hold one step; cosine over max_steps - 3 = 4 steps down to 0.1; then min_lr.
    assert [lr_at(s, optim, 7) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_at(5, optim, 7) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 2 / 4)))
    assert lr_at(7, optim, 7) == pytest.approx(0.1)
    assert lr_at(50, optim, 7) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(3, 2)
    optim = _optim()
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, max_steps=7)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, optim, 7) for s in range(4)])


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([3, 3])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_clip_gradients_scales_to_the_global_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    assert clip_gradients(model, clip_val=1.0) == pytest.approx(5.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_unknown_optimizer_names_the_key():
    with pytest.raises(InvalidArgument, match="model.optim.name"):
        build_optimizer(torch.nn.Linear(1, 1), OptimConfig(name="sgd"))
