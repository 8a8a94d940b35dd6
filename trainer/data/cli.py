"""`aligner data`: prepare data sets.

    aligner data hh --input DIR --output DIR [--strict]
    aligner data synthetic --output DIR [--seed N] [--num-train N] [--num-test N]

Formats and the synthetic task: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from trainer.data import hh, synthetic

MAX_PRINTED_PROBLEMS = 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligner data", description="Prepare comparison, prompt and SFT data sets."
    )
    sub = parser.add_subparsers(dest="source", metavar="<source>", required=True)

    p = sub.add_parser("hh", help="Anthropic-HH jsonl[.gz] files -> comparisons and prompts")
    p.add_argument(
        "--input",
        required=True,
        help="folder with train.jsonl[.gz] / test.jsonl[.gz] (or subset folders holding them)",
    )
    p.add_argument(
        "--output", required=True, help="folder for {train,test}_{comparisons,prompts}.jsonl and summary.json"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record")

    p = sub.add_parser("synthetic", help="the 'say WORD N times' task with a hidden ground truth")
    p.add_argument(
        "--output",
        required=True,
        help="folder for the SFT, comparison and prompt files and ground_truth.json",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--num-train", type=int, default=4000, help="SFT examples, pairs and prompts in the train split"
    )
    p.add_argument(
        "--num-test", type=int, default=500, help="SFT examples (val), pairs and prompts in the test split"
    )
    return parser


def _run_hh(args: argparse.Namespace) -> int:
    reports = hh.convert(args.input, args.output, strict=args.strict)
    for report in reports.values():
        for problem in report.problems[:MAX_PRINTED_PROBLEMS]:
            print(f"warning: {problem}", file=sys.stderr)
        if len(report.problems) > MAX_PRINTED_PROBLEMS:
            print(
                f"warning: ... and {len(report.problems) - MAX_PRINTED_PROBLEMS} more in summary.json",
                file=sys.stderr,
            )
    for split, r in reports.items():
        malformed = ", ".join(f"{k} {r.malformed[k]}" for k in hh.MALFORMED_KINDS)
        skipped = ", ".join(f"{k} {r.skipped[k]}" for k in hh.SKIP_KINDS)
        print(
            f"{split}: {r.records} records in {len(r.files)} file(s) -> {r.pairs} pairs; malformed: {malformed}; skipped: {skipped}"
        )
    print(
        f"wrote {', '.join(f'{s}_comparisons.jsonl, {s}_prompts.jsonl' for s in reports)}, summary.json to {args.output}"
    )
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    info = synthetic.generate(args.output, seed=args.seed, num_train=args.num_train, num_test=args.num_test)
    for split, stats in info["stats"].items():
        print(f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    print(
        f"wrote the '{info['task']}' task (seed {args.seed}, {args.num_train} train / {args.num_test} test) to {args.output}"
    )
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return _run_hh(args) if args.source == "hh" else _run_synthetic(args)
