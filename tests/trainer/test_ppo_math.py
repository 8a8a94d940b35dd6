"""PPO math against values computed by hand (the arithmetic is written out next to each case)."""

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.errors import InvalidArgument
from trainer.ppo import (
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    shaped_rewards,
    value_loss,
)


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# --- mask ------------------------------------------------------------------------------------


def test_response_mask_marks_next_token_positions_of_the_response():
    # seq_len 6 -> 5 next-token positions.
    # row 0: prompt 2, end 5 -> t in [1, 4): 0 1 1 1 0
    # row 1: prompt 1, end 6 -> t in [0, 5): 1 1 1 1 1
    # row 2: prompt 3, end 3 (empty response) -> all 0
    m = response_mask(torch.tensor([2, 1, 3]), torch.tensor([5, 6, 3]), seq_len=6)
    assert m.dtype == torch.float32
    assert m.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    "prompts, ends, field",
    [([0], [3], "prompt_lengths"), ([3], [2], "response_ends"), ([1], [7], "response_ends")],
)
def test_response_mask_rejects_bad_lengths(prompts, ends, field):
    with pytest.raises(InvalidArgument) as e:
        response_mask(torch.tensor(prompts), torch.tensor(ends), seq_len=6)
    assert e.value.field == field


# --- masked statistics -----------------------------------------------------------------------


def test_masked_mean_var_ignore_masked_entries():
    x, m = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    close(masked_mean(x, m), 2.0)  # (1+2+3)/3
    close(masked_var(x, m), 2.0 / 3.0)  # (1+0+1)/3, biased
    # per-row mean: row 0 (1+3)/2 = 2, row 1 5/1 = 5, empty row -> 0 (not NaN)
    x2 = t([1.0, 9.0, 3.0], [5.0, 7.0, 7.0], [4.0, 4.0, 4.0])
    m2 = t([1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    close(masked_mean(x2, m2, dim=1), [2.0, 5.0, 0.0])
    close(masked_mean(x2, torch.zeros_like(m2)), 0.0)


def test_masked_whiten_by_hand():
    # masked entries 1, 2, 3: mean 2, var 2/3 -> (x - 2) / sqrt(2/3) = -1.2247, 0, 1.2247; masked -> 0
    w = masked_whiten(t([1.0, 2.0, 3.0, 10.0]), t([1.0, 1.0, 1.0, 0.0]), eps=0.0)
    s = math.sqrt(2.0 / 3.0)
    close(w, [-1 / s, 0.0, 1 / s, 0.0])


def test_masked_whiten_gives_mean_0_var_1_on_masked_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 5
    m = (torch.rand(4, 9, generator=g) > 0.4).double()
    w = masked_whiten(x, m, eps=0.0)
    close(masked_mean(w, m), 0.0, atol=1e-9)
    close(masked_var(w, m), 1.0, atol=1e-9)
    assert (w[m == 0] == 0).all()


# --- KL ----------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    actor, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_penalty(actor, ref, "k1"), [0.5, -1.0])
    close(kl_penalty(actor, ref, "abs"), [0.5, 1.0])
    close(kl_penalty(actor, ref), [0.5, 1.0])  # abs is the default
    # k3: d = ref - actor = [-0.5, 1.0]; exp(-0.5) + 0.5 - 1 = 0.1065307, e - 1 - 1 = 0.7182818
    close(kl_penalty(actor, ref, "k3"), [0.10653066, 0.71828183])


def test_k3_is_non_negative_and_zero_only_at_equality():
    g = torch.Generator().manual_seed(1)
    a, r = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    k3 = kl_penalty(a, r, "k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert (kl_penalty(a, a, "k3") == 0).all()
    assert torch.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([-1e4]), "k3")).all()


def test_kl_rejects_unknown_estimator():
    with pytest.raises(InvalidArgument, match="k2"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k2")


# --- shaped rewards --------------------------------------------------------------------------

MASK_2x3 = [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]  # row 0: prompt 2, end 4; row 1: prompt 1, end 3


def test_mask_2x3_matches_response_mask():
    assert response_mask(torch.tensor([2, 1]), torch.tensor([4, 3]), 4).tolist() == MASK_2x3


def test_shaped_rewards_by_hand():
    kl = t([1.0, 0.2, -0.4], [0.5, 0.3, 9.0])
    scores, ends = t([2.0, -1.0]), torch.tensor([4, 3])  # last response token at 4-2=2 and 3-2=1
    r = shaped_rewards(scores, kl, t(*MASK_2x3), 0.1, ends)
    # row 0: [masked, -0.1*0.2, -0.1*-0.4 + 2.0] ; row 1: [-0.1*0.5, -0.1*0.3 - 1.0, masked]
    close(r, [[0.0, -0.02, 2.04], [-0.05, -1.03, 0.0]])
    # standardised score: (2 - 1) / 2 = 0.5 and (-1 - 1) / 2 = -1.0
    r = shaped_rewards(scores, kl, t(*MASK_2x3), 0.1, ends, std_mean=1.0, std_std=2.0)
    close(r, [[0.0, -0.02, 0.54], [-0.05, -1.03, 0.0]])


def test_shaped_rewards_rejects_bad_inputs():
    kl, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(InvalidArgument) as e:
        shaped_rewards(torch.zeros(2), kl, m, 0.1, torch.tensor([4, 5]))  # 5-2 = 3 is out of range
    assert e.value.field == "response_ends"
    with pytest.raises(InvalidArgument) as e:
        shaped_rewards(torch.zeros(3), kl, m, 0.1, torch.tensor([4, 4]))
    assert e.value.field == "rm_scores"
    with pytest.raises(InvalidArgument) as e:
        shaped_rewards(torch.zeros(2), kl, m, 0.1, torch.tensor([4, 4]), std_std=0.0)
    assert e.value.field == "std_std"


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_1x4_by_hand():
    # gamma 1, lam 0.95, V beyond the end = 0
    # t3: delta = 1.0 + 0 - 0.8 = 0.2             A3 = 0.2
    # t2: delta = 0.2 + 0.8 - 0.6 = 0.4           A2 = 0.4 + 0.95*0.2 = 0.59
    # t1: delta = 0.0 + 0.6 - 0.4 = 0.2           A1 = 0.2 + 0.95*0.59 = 0.7605
    # t0: delta = -0.1 + 0.4 - 0.5 = -0.2         A0 = -0.2 + 0.95*0.7605 = 0.522475
    rewards, values = t([[-0.1, 0.0, 0.2, 1.0]]), t([[0.5, 0.4, 0.6, 0.8]])
    adv, ret = gae(rewards, values, torch.ones(1, 4, dtype=torch.float64), gamma=1.0, lam=0.95)
    close(adv, [[0.522475, 0.7605, 0.59, 0.2]])
    close(ret, [[1.022475, 1.1605, 1.19, 1.0]])  # A + V


def test_gae_with_discount_by_hand():
    # gamma 0.9, lam 0.95: t1: delta = 1 - 0.2 = 0.8, A1 = 0.8
    # t0: delta = 0 + 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.9*0.95*0.8 = 0.364
    adv, ret = gae(t([[0.0, 1.0]]), t([[0.5, 0.2]]), torch.ones(1, 2), gamma=0.9, lam=0.95)
    close(adv, [[0.364, 0.8]])
    close(ret, [[0.864, 1.0]])


def test_gae_2x3_with_mask_by_hand():
    # masked entries (9, 5, 7, 3) must not leak anywhere.
    values = t([9.0, 0.5, 0.3], [0.2, 0.6, 7.0])
    rewards = t([5.0, 0.1, 0.7], [0.0, 1.0, 3.0])
    # row 0 (mask 0 1 1): t2: delta = 0.7 - 0.3 = 0.4, A = 0.4; t1: delta = 0.1 + 0.3 - 0.5 = -0.1,
    #   A = -0.1 + 0.95*0.4 = 0.28; t0 masked -> 0.  returns = [0, 0.78, 0.7]
    # row 1 (mask 1 1 0): t2 masked; t1: delta = 1.0 + 0 - 0.6 = 0.4, A = 0.4;
    #   t0: delta = 0 + 0.6 - 0.2 = 0.4, A = 0.4 + 0.95*0.4 = 0.78.  returns = [0.98, 1.0, 0]
    adv, ret = gae(rewards, values, t(*MASK_2x3))
    close(adv, [[0.0, 0.28, 0.4], [0.78, 0.4, 0.0]])
    close(ret, [[0.0, 0.78, 0.7], [0.98, 1.0, 0.0]])


def test_gae_carries_no_gradient():
    values = torch.tensor([[0.5, 0.4]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


# --- policy loss -------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    # ratios 1.0, 1.3, 0.7, 1.1 with A = 1, 1, -1, -2, eps 0.2:
    #   tok0: max(-1*1.0, -1*1.0) = -1.0
    #   tok1: max(-1.3, -1.2) = -1.2   (clipped: ratio above 1+eps with A > 0)
    #   tok2: max(0.7, 0.8) = 0.8      (clipped: ratio below 1-eps with A < 0)
    #   tok3: max(2.2, 2.2) = 2.2      (ratio 1.1 inside the range)
    # loss = (-1 - 1.2 + 0.8 + 2.2) / 4 = 0.2 ; clip fraction 2/4 ; mean ratio 4.1/4 = 1.025
    logp_new = torch.log(t([[1.0, 1.3, 0.7, 1.1]])).requires_grad_()
    adv = t([[1.0, 1.0, -1.0, -2.0]])
    loss, stats = policy_loss(logp_new, torch.zeros(1, 4, dtype=torch.float64), adv, torch.ones(1, 4))
    close(loss, 0.2)
    close(stats["clip_fraction"], 0.5)
    close(stats["ratio_mean"], 1.025)
    loss.backward()
    # d/dlogp of -A*ratio is -A*ratio / 4 where unclipped, 0 where clipped: [-0.25, 0, 0, 0.55]
    close(logp_new.grad, [[-0.25, 0.0, 0.0, 0.55]])


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_policy_clipping_engages_exactly_beyond_eps(adv_sign):
    eps, d = 0.2, 1e-6
    # A > 0 clips above 1+eps, A < 0 clips below 1-eps.
    edge = 1 + eps if adv_sign > 0 else 1 - eps
    step = d if adv_sign > 0 else -d
    for ratio, clipped in [(edge - step, False), (edge + step, True)]:
        logp_new = torch.log(t([[ratio]])).requires_grad_()
        loss, stats = policy_loss(
            logp_new, torch.zeros(1, 1, dtype=torch.float64), t([[adv_sign]]), torch.ones(1, 1), eps=eps
        )
        loss.backward()
        assert (logp_new.grad.abs().item() == 0.0) == clipped, ratio
        assert stats["clip_fraction"].item() == float(clipped)


def test_policy_loss_masked_tokens_and_unfinished_sequences_contribute_nothing():
    # row 0: 2 response tokens with ratio 1 and A = 1, 3 -> loss = -(1 + 3)/2 = -2
    # row 1: garbage everywhere, but is_end = False; masked token of row 0 also garbage.
    logp_new = t([0.0, 0.0, 5.0], [3.0, -3.0, 7.0]).requires_grad_()
    logp_old = t([0.0, 0.0, -5.0], [0.0, 0.0, 0.0])
    adv = t([1.0, 3.0, 100.0], [50.0, -50.0, 9.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    loss, stats = policy_loss(logp_new, logp_old, adv, mask, is_end=torch.tensor([True, False]))
    close(loss, -2.0)
    close(stats["ratio_mean"], 1.0)
    loss.backward()
    assert (logp_new.grad[1] == 0).all() and logp_new.grad[0, 2] == 0
    # all sequences excluded: zero loss, not NaN
    loss, _ = policy_loss(logp_new, logp_old, adv, mask, is_end=torch.tensor([False, False]))
    assert loss.item() == 0.0


def test_entropy_from_logits_by_hand():
    # [0, 0] -> uniform over 2: ln 2 ; [0, ln 3] -> p = 1/4, 3/4: -(1/4 ln 1/4 + 3/4 ln 3/4)
    h = entropy_from_logits(torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]]))
    close(h, [[math.log(2.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)]], atol=1e-6)
    h16 = entropy_from_logits(torch.tensor([[[0.0, 0.0]]], dtype=torch.bfloat16))
    assert h16.dtype == torch.float32
    close(h16, [[math.log(2.0)]], atol=1e-6)


def test_entropy_bonus_subtracts_coef_times_masked_mean_entropy():
    logp = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    entropy = torch.tensor([[0.5, 1.5, 100.0]])  # masked mean = 1.0
    base, _ = policy_loss(logp, logp, adv, mask)
    loss, stats = policy_loss(logp, logp, adv, mask, entropy=entropy, entropy_coef=0.1)
    close(base, -1.0)
    close(loss, -1.0 - 0.1 * 1.0)
    close(stats["entropy"], 1.0)


# --- value loss --------------------------------------------------------------------------------


def test_value_loss_by_hand():
    values, old, returns = t([[1.0, 0.5, 0.0]]), t([[0.5, 0.5, 0.5]]), t([[1.5, 0.0, 0.4]])
    mask = torch.ones(1, 3, dtype=torch.float64)
    # tok0: V_clip = 0.5 + 0.2 = 0.7: max((0.7-1.5)^2, (1.0-1.5)^2) = max(0.64, 0.25) = 0.64 (clipped)
    # tok1: V_clip = 0.5: both 0.25
    # tok2: V_clip = 0.5 - 0.2 = 0.3: max((0.3-0.4)^2, (0-0.4)^2) = max(0.01, 0.16) = 0.16
    # loss = 0.5 * (0.64 + 0.25 + 0.16) / 3 = 0.175
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.175)
    close(stats["clip_fraction"], 1 / 3)
    # unclipped: 0.5 * (0.25 + 0.25 + 0.16) / 3 = 0.11
    for c in (0.0, -1.0):
        loss, stats = value_loss(values, old, returns, mask, clip=c)
        close(loss, 0.11)
        close(stats["clip_fraction"], 0.0)


def test_value_loss_ignores_masked_tokens():
    values, old, returns = t([[1.0, 50.0]]), t([[1.0, -50.0]]), t([[0.0, 80.0]])
    loss, _ = value_loss(values, old, returns, t([[1.0, 0.0]]))
    close(loss, 0.5)  # 0.5 * (1 - 0)^2


# --- distributed normalisation -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whiten_worker(rank: int, world: int, port: int, xs, ms, expected):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w = masked_whiten(xs[rank], ms[rank])
        torch.testing.assert_close(w, expected[rank], atol=1e-9, rtol=0)
    finally:
        dist.destroy_process_group()


def test_distributed_whiten_equals_single_process_on_concatenated_data(monkeypatch):
    g = torch.Generator().manual_seed(2)
    # rank 0 holds small values, rank 1 large ones with a different length and mask count
    xs = [
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64) * 4 + 10,
    ]
    ms = [(torch.rand(2, 5, generator=g) > 0.3).double(), (torch.rand(3, 5, generator=g) > 0.6).double()]
    whole = masked_whiten(torch.cat(xs), torch.cat(ms))
    expected = [whole[:2], whole[2:]]
    local = masked_whiten(xs[1], ms[1])
    assert not torch.allclose(local, expected[1])  # the test can tell global from local stats
    # spawn, not fork: a forked child would inherit this test process's own default process group
    # (other tests initialise one) and could not start the two-rank group. The spawned children
    # import this module by its name under the repository root.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.start_processes(
        _whiten_worker, args=(2, _free_port(), xs, ms, expected), nprocs=2, join=True, start_method="spawn"
    )
