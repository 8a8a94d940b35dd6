"""The `aligner` console entry point: `aligner <command> [args]`.

Each command's module is imported only when it runs (megatron-core takes seconds to import), and
its `main(argv) -> int` parses its own arguments. User errors end in one line on stderr and exit 2.

Quiet by default: known-benign third-party warnings and log lines are filtered before the command's
imports (`common.logging.quiet_third_party`). `aligner --verbose <command>` (a global flag, before
the command; or ALIGNER_VERBOSE=1) shows everything at DEBUG, in this process and in every process
it starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

from omegaconf.errors import OmegaConfBaseException

from common.config import ConfigError
from common.errors import AlignerError
from common.logging import quiet_third_party, set_verbose

VERBOSE_FLAGS = ("-v", "--verbose")

# command -> (module with main(argv), help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("services.demo", "The whole pipeline on a tiny model, on CPU"),
    "data": ("trainer.data.cli", "Prepare data: Anthropic-HH files or the synthetic task (hh, synthetic)"),
    "sft": ("trainer.sft", "Supervised fine-tuning (loss on response tokens only)"),
    "train-rm": ("trainer.rm", "Train a Bradley-Terry reward model on comparison pairs"),
    "eval": ("trainer.eval_rm", "Evaluate a model: eval rm (reward-model pair accuracy on comparisons files)"),
    "convert": ("trainer.convert_cli", "Hugging Face Llama/Mistral checkpoints <-> ours (import-hf, export-hf)"),
    "up": ("services.launch.up", "Start generation, reward-critic and reference locally (127.0.0.1)"),
    "ppo": ("services.orchestrator.main", "PPO over the generation, reward-critic and reference services"),
    "serve": ("services.serve", "Run one service: aligner serve <service> --config FILE [overrides]"),
    "tokenizer": ("trainer.tokenizer_cli", "Train a byte-level BPE tokenizer offline; inspect one"),
    "doctor": ("services.doctor", "Check this machine: versions, CUDA, Triton, TensorRT-LLM, ports, pins"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligner",
        description="RLHF for large language models: data, SFT, reward model, PPO over gRPC services.",
        epilog="Run `aligner <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"aligner {version('aligner')}")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                        help="show every warning and DEBUG logs, here and in the processes a command starts")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in VERBOSE_FLAGS:
        argv = argv[1:]
        set_verbose()
    quiet_third_party()  # before the command's imports: megatron-core warns while importing
    parser = _parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    command, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except (AlignerError, ConfigError, OmegaConfBaseException) as exc:
        print(f"aligner {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aligner {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
