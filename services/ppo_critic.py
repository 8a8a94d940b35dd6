"""`aligner serve ppo-critic`: NeMo-Aligner's `serve_ppo_critic.py` under its own keys.

    aligner serve ppo-critic pretrained_checkpoint.restore_from_path=RM trainer.ppo.port=5567 \\
        trainer.ppo.inference_micro_batch_size=4 exp_manager.explicit_log_dir=critic_results

`trainer.ppo.combine_rm_and_critic_server` picks the server, as in NeMo-Aligner: true (the
default) runs the reward-critic server (`services.reward_critic.server`: reward model and critic
on one port), false the critic alone (`services.critic.server`). The other NeMo names resolve to
the schema's keys (`common.config.ALIASES`); the server runs exactly as `aligner serve
reward-critic` / `critic` with the same config.
"""

from __future__ import annotations

import sys

from services.model_server import parse_args, run_service


def main(argv: list[str] | None = None) -> int:
    from services.critic import server as critic
    from services.reward_critic import server as reward_critic

    config, ports_file = parse_args("ppo-critic", sys.argv[1:] if argv is None else argv)
    combined = config.trainer.ppo.combine_rm_and_critic_server is not False  # NeMo's default: true
    module = reward_critic if combined else critic
    return run_service(module.SERVICE, config, ports_file, module.build)


if __name__ == "__main__":
    sys.exit(main())
