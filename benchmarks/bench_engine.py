"""Sampling throughput: our KV-cached engine (`trainer.engine.TorchEngine` on the Megatron model)
against `transformers` `LlamaForCausalLM.generate` on the same weights.

Batch 16, prompts of 8-32 tokens (ragged: both left-pad), exactly 64 new tokens per prompt (no
end id), the same sampling settings and torch threads for all. Tokens/s counts new tokens only.
The engine runs with each decode path: `megatron` (every step through the GPTModel) and `fused`
(`trainer.fused_decode`); one row per case and path, all three contenders timed in turn.
"""

from __future__ import annotations

import torch

from benchmarks.harness import ARCH, interleaved, same_weights_models, threads

BATCH, NEW_TOKENS, REPEATS = 16, 64, 7
DECODE = ("megatron", "fused")
CASES = {  # name -> (temperature, top_k, top_p)
    "sample T=1": (1.0, 0, 1.0),
    "top-k 50, top-p 0.9": (1.0, 50, 0.9),
}


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (BATCH,), generator=g).tolist()
    return [torch.randint(1, ARCH.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    return ids, mask


def run() -> list[dict]:
    from trainer.engine import SamplingParams, TorchEngine

    n_threads = threads()
    ours, theirs, logit_diff = same_weights_models()
    prompts = _prompts()
    ids, mask = _left_padded(prompts)

    def hf_generate(**sampling):
        with torch.inference_mode():
            out = theirs.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=0,
                eos_token_id=None,
                **sampling,
            )
        assert out.shape == (BATCH, ids.shape[1] + NEW_TOKENS)
        return out

    engines = {mode: TorchEngine(ours, max_seq_len=ARCH.encoder_seq_length, decode=mode) for mode in DECODE}

    # Same weights: greedy continuations agree token for token.
    hf_greedy = hf_generate(do_sample=False)[:, ids.shape[1] :].tolist()
    agree = {}
    for mode, engine in engines.items():
        greedy = engine.generate(prompts, [SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)] * BATCH)
        agree[mode] = sum(
            a == b for r, h in zip(greedy, hf_greedy, strict=True) for a, b in zip(r.tokens, h, strict=True)
        )

    tokens = BATCH * NEW_TOKENS
    rows = []
    for name, (temperature, top_k, top_p) in CASES.items():
        params = [
            SamplingParams(
                max_new_tokens=NEW_TOKENS, temperature=temperature, top_k=top_k, top_p=top_p, seed=i
            )
            for i in range(BATCH)
        ]

        def ours_fn(engine, params=params):
            results = engine.generate(prompts, params)
            assert all(len(r.tokens) == NEW_TOKENS for r in results)

        def theirs_fn(temperature=temperature, top_k=top_k, top_p=top_p):
            torch.manual_seed(0)
            hf_generate(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)

        contenders = {mode: (lambda e=engine: ours_fn(e)) for mode, engine in engines.items()}
        t = interleaved({**contenders, "transformers": theirs_fn}, REPEATS)
        for mode in DECODE:
            rows.append(
                {
                    "case": f"generate {name}, batch {BATCH} x {NEW_TOKENS} new, decode={mode}",
                    "unit": "tokens/s",
                    "ours": tokens / t[mode],
                    "transformers": tokens / t["transformers"],
                    "ratio": t["transformers"] / t[mode],
                    "threads": n_threads,
                    "notes": f"greedy agree {agree[mode]}/{tokens}, max logit diff {logit_diff:.1e}",
                }
            )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
