"""Reward model and critic in one process (`aligner serve reward-critic`)."""
