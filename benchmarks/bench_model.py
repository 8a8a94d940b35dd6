"""Training step cost: forward + backward of our Megatron model against `transformers`
`LlamaForCausalLM` with the same weights, batch 8 x 128 tokens, the same next-token cross-entropy
on the logits, the same torch threads. Reports milliseconds per step (lower is better)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import ARCH, interleaved, same_weights_models, threads

BATCH, SEQ, REPEATS = 8, 128, 10


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def run() -> list[dict]:
    n_threads = threads()
    ours, theirs, logit_diff = same_weights_models()
    ours.train(), theirs.train()
    tokens = torch.randint(0, ARCH.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def step(model, logits_of):
        model.zero_grad(set_to_none=True)
        loss = _loss(logits_of(tokens), tokens)
        loss.backward()
        return loss

    def ours_fn():
        return step(ours, lambda t: ours(t).logits)

    def theirs_fn():
        return step(theirs, lambda t: theirs(t).logits)

    loss_diff = abs(ours_fn().item() - theirs_fn().item())
    t = interleaved({"ours": ours_fn, "transformers": theirs_fn}, REPEATS)
    t_ours, t_theirs = t["ours"], t["transformers"]
    return [
        {
            "case": f"forward+backward, batch {BATCH} x {SEQ}",
            "unit": "ms/step",
            "ours": t_ours * 1e3,
            "transformers": t_theirs * 1e3,
            "ratio": t_theirs / t_ours,
            "threads": n_threads,
            "notes": f"loss diff {loss_diff:.1e}, max logit diff {logit_diff:.1e}",
        }
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
