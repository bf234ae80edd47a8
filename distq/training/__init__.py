"""A training run from config to outputs: the loop over episodes on a backend, checkpoints and reports, the
evaluation against the data and the perfect learner, and the KL budget's monitor (trainer, evaluation, budget)."""
