"""`aligner demo`: the whole pipeline on a tiny model (assembled by the PPO orchestrator issue)."""

import sys


def main(argv: list[str]) -> int:
    print("aligner demo: the end-to-end pipeline is not assembled yet (needs the PPO orchestrator)", file=sys.stderr)
    return 1
