"""`aligner eval rm`: a reward model's pair accuracy and Bradley-Terry loss on comparisons files.

    aligner eval rm --checkpoint runs/rm/final --data test_comparisons.jsonl [--data more.jsonl]
                    [--tokenizer DIR] [--micro-batch-size 16] [--out result.json]

`--checkpoint` is one of our checkpoints with a value head (`<run_dir>/final` of `aligner
train-rm`) or a run directory (its latest checkpoint). The texts are encoded as in training
(`trainer.rm.encode_for_reward`); pairs longer than the model's context are dropped and counted.
Prints one JSON object: accuracy, loss, num_pairs, num_dropped, mean rewards of chosen and
rejected texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.errors import InvalidArgument


def evaluate_checkpoint(
    checkpoint: str, data: list[str], tokenizer_path: str | None, micro_batch_size: int
) -> dict:
    from trainer import loop
    from trainer.checkpoint import load_model_for_inference
    from trainer.data.datasets import ComparisonDataset
    from trainer.rm import evaluate_pairs
    from trainer.tokenizer import Tokenizer

    if micro_batch_size < 1:
        raise InvalidArgument("--micro-batch-size", f"must be >= 1, got {micro_batch_size}")
    model, arch, tokenizer = load_model_for_inference(checkpoint)
    if model.value_head is None:
        raise InvalidArgument("--checkpoint", f"{checkpoint} has no value head: it is not a reward model")
    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer is None:
        raise InvalidArgument("--tokenizer", f"not given, and {checkpoint} stores no tokenizer")
    dataset = ComparisonDataset(data, tokenizer, arch.encoder_seq_length)
    result = evaluate_pairs(
        model, dataset, list(range(len(dataset))), micro_batch_size, tokenizer.pad_id, loop.data_parallel()
    )
    return {**result, "num_dropped": dataset.num_dropped, "checkpoint": str(checkpoint), "files": data}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aligner eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", metavar="<what>", required=True)
    p = sub.add_parser("rm", help="reward-model accuracy and loss on comparisons files")
    p.add_argument("--checkpoint", required=True, help="reward-model checkpoint or run directory")
    p.add_argument("--data", action="append", required=True, help="comparisons jsonl (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer.json or directory (default: the checkpoint's)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="pairs per forward pass")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--out", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.tokenizer, args.micro_batch_size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
