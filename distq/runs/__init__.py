"""A run's records: the run directory and its files, checkpoints, the metrics table and progress line, signals
that stop a run, the figures, and single-run W&B tracking."""
