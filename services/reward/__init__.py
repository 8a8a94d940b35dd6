"""The reward model server (`aligner serve reward`) and its typed client (`RewardClient`)."""
