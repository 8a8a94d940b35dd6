"""Data preparation (`aligner data`) and the readers the trainers use; formats in docs/data.md."""
