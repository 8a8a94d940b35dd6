"""`aligner serve reward-critic`: the reward model and the critic in one process (the seed's
`trainer.ppo.combine_rm_and_critic_server=True`), serving `aligner.v1.Reward` and
`aligner.v1.Critic` on one port.

`Score` with `return_values=true` returns the rewards and the critic's per-token values of the
same sequences in one round trip (the two forward passes are batched separately and run back to
back on the model thread). Both models stay on the accelerator, or, with
`trainer.ppo.swap_models_to_cpu=true`, only the one computing is there and the other waits in CPU
memory (`services.model_server.ModelWorker`). `checkpoint_path` is the reward model;
`critic_checkpoint_path` (default: the reward model too) initialises the critic.
"""

from __future__ import annotations

import sys

from common.config import ModelServiceConfig
from services.critic.server import CriticComponent
from services.model_server import ModelWorker, serve
from services.reward.server import RewardComponent

SERVICE = "reward-critic"


def build(config: ModelServiceConfig, worker: ModelWorker) -> list:
    critic = CriticComponent(config, worker)
    return [RewardComponent(config, worker, critic=critic), critic]


def main(argv: list[str] | None = None) -> int:
    return serve(SERVICE, sys.argv[1:] if argv is None else argv, build)


if __name__ == "__main__":
    sys.exit(main())
