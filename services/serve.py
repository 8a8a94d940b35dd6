"""`aligner serve <service> --config FILE [overrides]`: start one model service.

`SERVICES` maps a service name to the module that runs it; each module exposes
`main(argv) -> int` and parses its own `--config FILE` and dotted overrides.
"""

from __future__ import annotations

import argparse
import importlib

# service -> (module with main(argv), help)
SERVICES: dict[str, tuple[str, str]] = {
    "generation": (
        "services.generation.server",
        "Triton generation server (TensorRT-LLM contract) + weight updates",
    ),
    "reward": ("services.reward.server", "Reward model scoring (aligner.v1.Reward), the public endpoint"),
    "critic": ("services.critic.server", "PPO critic: values, training, checkpoints (aligner.v1.Critic)"),
    "reward-critic": ("services.reward_critic.server", "Reward model + critic in one process"),
    "ppo-critic": (
        "services.ppo_critic",
        "NeMo-Aligner's serve_ppo_critic.py: reward-critic, or the critic alone with "
        "trainer.ppo.combine_rm_and_critic_server=false",
    ),
    "reference": ("services.reference.server", "Reference policy logprobs (aligner.v1.Reference)"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aligner serve",
        description="Start one service. Run `aligner serve <service> --help` for its options.",
    )
    parser.add_argument(
        "service", choices=sorted(SERVICES), help="; ".join(f"{k}: {v[1]}" for k, v in SERVICES.items())
    )
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(SERVICES[args.service][0])
    return int(module.main(argv[1:]) or 0)
