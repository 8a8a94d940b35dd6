"""The reference (initial) policy server (`aligner serve reference`): per-token logprobs."""
