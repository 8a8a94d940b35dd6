"""SFT cross-entropy, next-token log-probabilities and the Bradley-Terry loss, by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.errors import InvalidArgument
from trainer.losses import bradley_terry_loss, sft_loss, token_logprobs

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def _tiny():
    # B=1, S=3, V=2. Position 0 logits [0, 0] predict token 1 (=1): p = 1/2.
    # Position 1 logits [0, ln 3] predict token 2 (=1): p = 3/4. Position 2 has no next token.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]])
    tokens = torch.tensor([[0, 1, 1]])
    return logits, tokens


def test_token_logprobs_by_hand():
    logits, tokens = _tiny()
    lp = token_logprobs(logits, tokens)
    assert lp.shape == (1, 2) and lp.dtype == torch.float32
    close(lp, [[-LN2, -LN43]])


def test_token_logprobs_matches_log_softmax_and_handles_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    close(token_logprobs(logits, tokens), ref, atol=1e-5)
    lp16 = token_logprobs(logits.bfloat16(), tokens)
    assert lp16.dtype == torch.float32
    ref16 = (
        torch.log_softmax(logits.bfloat16().float()[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    )
    close(lp16, ref16, atol=1e-5)


def test_token_logprobs_gradient_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 5), generator=g)
    token_logprobs(logits, tokens).sum().backward()
    other = logits.detach().clone().requires_grad_()
    torch.log_softmax(other[:, :-1], -1).gather(-1, tokens[:, 1:, None]).sum().backward()
    close(logits.grad, other.grad, atol=1e-10)


def test_sft_loss_by_hand_and_mask():
    logits, tokens = _tiny()
    close(sft_loss(logits, tokens, torch.tensor([[1.0, 1.0]])), (LN2 + LN43) / 2)  # 0.4904146
    close(sft_loss(logits, tokens, torch.tensor([[0.0, 1.0]])), LN43)  # prompt token masked out
    close(sft_loss(logits, tokens, torch.tensor([[0.0, 0.0]])), 0.0)


def test_sft_loss_agrees_with_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    tokens = torch.randint(0, 9, (2, 6), generator=g)
    mask = torch.ones(2, 5)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 9), tokens[:, 1:].reshape(-1))
    close(sft_loss(logits, tokens, mask), ce, atol=1e-5)


def test_sft_loss_rejects_misshaped_inputs():
    logits, tokens = _tiny()
    with pytest.raises(InvalidArgument) as e:
        sft_loss(logits, tokens, torch.ones(1, 3))
    assert e.value.field == "loss_mask"
    with pytest.raises(InvalidArgument) as e:
        token_logprobs(logits, tokens[:, :2])
    assert e.value.field == "tokens"


def test_bradley_terry_by_hand():
    # diffs 1 and -0.5: log(1 + e^-1) = 0.31326169, log(1 + e^0.5) = 0.97407698, mean 0.64366934
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    loss, acc = bradley_terry_loss(rc, rr)
    close(loss, 0.64366934)
    close(acc, 0.5)
    # margin 0.5: diffs 0.5 and -1: log(1 + e^-0.5) = 0.47407698, log(1 + e) = 1.31326169
    loss, acc = bradley_terry_loss(rc, rr, margin=0.5)
    close(loss, 0.89366934)
    close(acc, 0.5)  # accuracy ignores the margin
    loss, _ = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.5]))
    close(loss, 0.89366934)


def test_bradley_terry_ties_are_wrong_and_gradient_pushes_apart():
    rc = torch.tensor([0.3, 2.0], requires_grad=True)
    rr = torch.tensor([0.3, 1.0], requires_grad=True)
    loss, acc = bradley_terry_loss(rc, rr)
    close(acc, 0.5)
    loss.backward()
    # d/d r_c of -logsigmoid(d)/2 = -sigmoid(-d)/2: tie -> -0.25, d = 1 -> -0.5*sigmoid(-1) = -0.1344707
    close(rc.grad, [-0.25, -0.13447071])
    close(rr.grad, [0.25, 0.13447071])


def test_bradley_terry_rejects_mismatched_pairs():
    with pytest.raises(InvalidArgument):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(InvalidArgument):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
