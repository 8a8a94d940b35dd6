"""From next-token logits to sampled tokens: pure tensor functions used by the sampling engine.

Every function works on a batch of rows, each row with its own parameters (a row is one
request), so requests with different settings share one forward pass. The order of the logits
processing is the usual one (as in Hugging Face `generate` and TensorRT-LLM): temperature, then
top-k, then top-p.

Sampling inverts each row's cumulative distribution at a uniform drawn from that row's own
`torch.Generator` (one uniform per step), so a row's sample depends only on its logits and its
seed, never on which other requests share the batch.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the sampling distribution of each row, -inf where excluded.

    logits: [B, V] float. temperature: [B] (> 0). top_k: [B] int, 0 = off.
    top_p: [B] in (0, 1], 1 = off. Returns [B, V] log-probabilities (log_softmax of the
    filtered, temperature-scaled logits).
    """
    scaled = logits / temperature.unsqueeze(1)
    use_k = top_k > 0
    use_p = top_p < 1.0
    filtered = use_k | use_p
    if bool(filtered.any()):
        if bool((use_k | ~use_p).all()):
            # Every top-p row also has a top-k: only the best max(k) tokens can survive, and
            # `topk` is far cheaper than sorting the whole vocabulary.
            sorted_logits, order = scaled.topk(int(top_k.max()), dim=-1)
        else:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(sorted_logits.size(-1), device=scaled.device).unsqueeze(0)
        # top-k: keep the k best (by rank, so ties at the threshold keep exactly k tokens).
        remove = use_k.unsqueeze(1) & (rank >= top_k.unsqueeze(1))
        # top-p, on the top-k survivors: keep the smallest prefix whose probability reaches p;
        # the best token always stays (the mass before it is 0), so a tiny p is greedy.
        probs = sorted_logits.masked_fill(remove, NEG_INF).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove = remove | (use_p.unsqueeze(1) & (mass_before >= top_p.unsqueeze(1)))
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, order, ~remove)
        scaled = scaled.masked_fill(filtered.unsqueeze(1) & ~keep, NEG_INF)
    return scaled.log_softmax(dim=-1)


def sample(logprobs: torch.Tensor, uniforms: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """One token per row from the distribution `logprobs` [B, V] (log-probabilities, -inf =
    excluded), by inverting its cumulative distribution at `uniforms` [B] (float32 in [0, 1));
    rows where `greedy` [B] is true take the most likely token instead. Returns [B] int64.

    The cumulative sum runs in float64 in vocabulary order. Because u < 1 in float32, u * total
    stays below the last cumulative value, so the chosen token (the first whose cumulative value
    exceeds u * total) always has a positive probability."""
    cdf = logprobs.double().exp().cumsum(dim=-1)
    target = uniforms.double().unsqueeze(1) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return torch.where(greedy, logprobs.argmax(dim=-1), drawn)


def draw_uniforms(generator: torch.Generator, steps: int, device) -> torch.Tensor:
    """The `steps` uniforms a request consumes, one per generated token, drawn at once from its
    own generator: the same seed gives the same draws whatever else shares the batch."""
    return torch.rand(steps, generator=generator, device=device, dtype=torch.float32)


def mask_token(logits: torch.Tensor, token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`logits` with `token[i]` set to -inf in the rows where `rows[i]` is true (e.g. the end
    token before the minimum length is reached). token, rows: [B]."""
    if not bool(rows.any()):
        return logits
    masked = logits.clone()
    index = token.clamp(min=0).unsqueeze(1)
    current = masked.gather(1, index)
    masked.scatter_(1, index, torch.where(rows.unsqueeze(1), torch.full_like(current, NEG_INF), current))
    return masked


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logprobs[i, tokens[i]] per row: [B, V], [B] -> [B]."""
    return logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
