"""The PPO critic server (`aligner serve critic`): values, training, checkpoints."""
