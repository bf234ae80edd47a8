"""Evaluation of a trained policy or of a file of samples (section 11), against fresh data."""
from __future__ import annotations

from typing import Optional

import torch

from distq.config import Config
from distq.data import Dataset
from distq.metrics import evaluate_samples
from distq.rollout import Rollout
from distq.schedules import TimeGrid

# Evaluation draws from its own stream, apart from training's (seed, episode, chunk) streams.
_EVAL_STREAM = 7919


def _generator(config: Config) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 100003 + _EVAL_STREAM)


def evaluate_policy(rollout: Rollout, dataset: Dataset, reward, config: Config, grid: Optional[TimeGrid] = None,
                    sampler: Optional[str] = None) -> tuple[dict[str, float], torch.Tensor]:
    """Reward and kNN KL of eval.batches batches of eval.n_samples mean-action samples; -> (metrics, samples (n, d))."""
    ev = config.eval
    return evaluate_samples(lambda n, g: rollout.generate(n, g, grid, sampler), dataset.reference, reward,
                            ev.n_samples, ev.batches, ev.k, _generator(config), dataset.reference_pair)


def evaluate_given(samples: torch.Tensor, dataset: Dataset, reward, config: Config) -> dict[str, float]:
    """The same metrics for given samples (n, d), cut into consecutive batches of eval.n_samples (fewer if short)."""
    n = min(config.eval.n_samples, samples.shape[0])
    batches = max(1, min(config.eval.batches, samples.shape[0] // n))
    cursor = iter(range(0, n * batches, n))

    def next_batch(size: int, generator: torch.Generator) -> torch.Tensor:
        start = next(cursor)
        return samples[start:start + size]

    metrics, _ = evaluate_samples(next_batch, dataset.reference, reward, n, batches, config.eval.k, _generator(config),
                                  dataset.reference_pair)
    return metrics
