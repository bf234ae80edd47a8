"""Evaluation of a trained policy or of a file of samples (section 11), against fresh data."""
from __future__ import annotations

from typing import Any, Optional

import torch

from distq.config import Config
from distq.data import Dataset
from distq.metrics import evaluate_samples, principal_projection
from distq.rollout import Rollout
from distq.schedules import TimeGrid

# Evaluation draws from its own stream, apart from training's (seed, episode, chunk) streams.
_EVAL_STREAM = 7919


def _generator(config: Config) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 100003 + _EVAL_STREAM)


def evaluate_policy(rollout: Rollout, dataset: Dataset, reward, config: Config, grid: Optional[TimeGrid] = None,
                    sampler: Optional[str] = None) -> tuple[dict[str, Any], torch.Tensor, Optional[torch.Tensor]]:
    """Reward and kNN KL of eval.batches batches of eval.n_samples mean-action samples; -> (metrics, samples (n, d),
    their condition indices (n,) or None).

    Conditional runs (Algorithm 2): the headline metrics compare samples with conditions in the data's shares to
    the data; metrics["per_condition"][value] compares each condition's samples with that condition's data."""
    ev, generator = config.eval, _generator(config)
    drawn: list[torch.Tensor] = []

    def generate(n: int, g: torch.Generator, condition: Optional[int] = None) -> torch.Tensor:
        if not dataset.classes:
            return rollout.generate(n, g, grid, sampler)
        conditions = rollout.draw_conditions(n, g) if condition is None else torch.full((n,), condition)
        if condition is None:
            drawn.append(conditions)
        return rollout.generate(n, g, grid, sampler, conditions)

    project = principal_projection(dataset.points, ev.pca) if ev.pca else None
    metrics, samples = evaluate_samples(generate, dataset.reference, reward, ev.n_samples, ev.batches, ev.k,
                                        generator, dataset.reference_pair, project)
    if not dataset.classes:
        return metrics, samples, None
    metrics["per_condition"] = {}
    for index, value in enumerate(dataset.condition_values):
        own, _ = evaluate_samples(lambda n, g: generate(n, g, index), lambda n, g: dataset.reference(n, g, index),
                                  reward, ev.n_samples, ev.batches, ev.k, generator,
                                  lambda n, g: dataset.reference_pair(n, g, index), project)
        metrics["per_condition"][str(value)] = {k: own[k] for k in ("reward_mean", "reward_ci95", "kl_mean",
                                                                     "kl_ci95", "kl_floor")}
    return metrics, samples, torch.cat(drawn)


def evaluate_given(samples: torch.Tensor, dataset: Dataset, reward, config: Config) -> dict[str, float]:
    """The same metrics for given samples (n, d), cut into consecutive batches of eval.n_samples (fewer if short)."""
    n = min(config.eval.n_samples, samples.shape[0])
    batches = max(1, min(config.eval.batches, samples.shape[0] // n))
    cursor = iter(range(0, n * batches, n))

    def next_batch(size: int, generator: torch.Generator) -> torch.Tensor:
        start = next(cursor)
        return samples[start:start + size]

    project = principal_projection(dataset.points, config.eval.pca) if config.eval.pca else None
    metrics, _ = evaluate_samples(next_batch, dataset.reference, reward, n, batches, config.eval.k, _generator(config),
                                  dataset.reference_pair, project)
    return metrics
