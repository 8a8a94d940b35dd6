"""The PPO orchestrator: drives generation, reward-critic and reference, trains the actor."""
