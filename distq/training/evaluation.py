"""Evaluation of a trained policy or of a file of samples (section 11), against fresh data."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from distq.backends.build import make_grid
from distq.backends.rollout import Rollout
from distq.errors import DistqError
from distq.maths.metrics import evaluate_samples, mean_ci95, principal_projection
from distq.maths.ratio import smoothed_variance, tilted_ratio_score
from distq.maths.samplers import reverse_process
from distq.maths.schedules import TimeGrid, make_schedule, prior_std
from distq.problems.data import Dataset
from distq.setup.config import Config

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
        drawn.append(rollout.draw_conditions(n, g) if condition is None else torch.full((n,), condition))
        return rollout.generate(n, g, grid, sampler, drawn[-1])

    def rewarded(x: torch.Tensor) -> torch.Tensor:
        """h of the batch just generated (with its conditions, which evaluate_samples does not see)."""
        return reward(x, drawn[-1]) if dataset.classes else reward(x)

    project = principal_projection(dataset.points, ev.pca) if ev.pca else None
    metrics, samples = evaluate_samples(generate, dataset.reference, rewarded, ev.n_samples, ev.batches, ev.k,
                                        generator, dataset.reference_pair, project)
    conditions = torch.cat(drawn) if dataset.classes else None
    metrics.update(per_reward(reward, samples, conditions))
    if not dataset.classes:
        return metrics, samples, None

    def own(index: int) -> dict[str, float]:
        return evaluate_samples(lambda n, g: generate(n, g, index), lambda n, g: dataset.reference(n, g, index),
                                rewarded, ev.n_samples, ev.batches, ev.k, generator,
                                lambda n, g: dataset.reference_pair(n, g, index), project)[0]

    metrics["per_condition"] = _per_condition(dataset, range(dataset.classes), own)
    return metrics, samples, conditions


def kl_reliability(config: Config, dim: int) -> dict[str, Any]:
    """{"kl_reliable": bool} and, if not, {"kl_warning": one line}. The kNN KL's bias shrinks like n^(-1/d') in the
    d' dimensions it is estimated in (eval.pca, else the data's d) with n = eval.n_samples per batch; a rule of thumb
    flags d' > 2 log2(n) (n^(-1/d') > 0.7: the k-th neighbours are not local; 500 columns at n = 300 report
    KL -12.9)."""
    used, n = min(config.eval.pca, dim) if config.eval.pca else dim, config.eval.n_samples
    if used <= 2 * math.log2(n):
        return {"kl_reliable": True}
    where = f"eval.pca = {used} components" if config.eval.pca else f"{dim} columns"
    return {"kl_reliable": False,
            "kl_warning": f"the kNN KL is unreliable in {where} at eval.n_samples = {n} (it needs about "
                          f"d <= 2 log2(n) = {2 * math.log2(n):.1f}); set eval.pca to at most "
                          f"{int(2 * math.log2(n))} principal components or raise eval.n_samples"}


@torch.no_grad()
def per_reward(reward, samples: torch.Tensor, conditions: Optional[torch.Tensor] = None) -> dict[str, float]:
    """reward_mean/<name> and reward_ci95/<name> of each entry h_i of a list reward.fn (a RewardSum) on samples
    (n, d) with their condition indices (n,) or None, as reward_mean of h; {} for a single reward."""
    if not hasattr(reward, "parts"):
        return {}
    metrics = {}
    for name, values in zip(reward.names, reward.parts(samples, conditions).T):
        metrics[f"reward_mean/{name}"], metrics[f"reward_ci95/{name}"] = mean_ci95(values)
    return metrics


PER_CONDITION_METRICS = ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95", "kl_floor")
"""The metrics of metrics["per_condition"][value] in conditional runs."""


def _per_condition(dataset: Dataset, indices, evaluate: Callable[[int], dict]) -> dict[str, dict[str, float]]:
    """{str(condition value): the PER_CONDITION_METRICS of evaluate(index)} for the condition indices `indices`."""
    per_condition = {}
    for index in indices:
        metrics = evaluate(index)
        per_condition[str(dataset.condition_values[index])] = {key: metrics[key] for key in PER_CONDITION_METRICS}
    return per_condition


@torch.inference_mode()
def perfect_learner_samples(config: Config, dataset: Dataset, reward, n: int, generator: torch.Generator,
                            sampler: Optional[str] = None) -> torch.Tensor:
    """n samples (n, d) of the reverse process whose action at every step is the exact tilted ratio score
    (distq.maths.ratio.tilted_ratio_score with log-weights beta h(x0_i), ratio.bandwidth included): the optimal policy's
    mean (E10) for the tilt (E7) of the training data, on the config's grid with its sampler (or `sampler`, which may
    be a generation-only one). What a perfect learner of Algorithm 1 generates; a learned policy's gap above its
    metrics is the learner's."""
    data, grid = dataset.points, make_grid(config)
    log_weights = config.train.beta * reward(data)
    y = torch.randn(n, dataset.dim, generator=generator) * prior_std(make_schedule(config.sde), config.sde.T)

    def action(k: int, y: torch.Tensor) -> torch.Tensor:
        mu = float(grid.mu[k])
        return tilted_ratio_score(y, data, mu, smoothed_variance(mu, float(grid.sigma2[k]), config.ratio.bandwidth),
                                  log_weights)

    return reverse_process(grid, sampler or config.sde.sampler, y, action,
                           lambda: torch.randn(n, dataset.dim, generator=generator))


def evaluate_perfect_learner(config: Config, dataset: Dataset, reward, sampler: Optional[str] = None) -> dict[str, float]:
    """The evaluation (as evaluate_given) of eval.batches x eval.n_samples perfect_learner_samples (with `sampler`)."""
    generator = torch.Generator().manual_seed(config.seed * 100003 + _EVAL_STREAM + 1)
    samples = perfect_learner_samples(config, dataset, reward, config.eval.n_samples * config.eval.batches, generator,
                                      sampler)
    return evaluate_given(samples, dataset, reward, config)


def evaluate_given(samples: torch.Tensor, dataset: Dataset, reward, config: Config,
                   conditions: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """The same metrics for given samples (n, d), cut into consecutive batches of eval.n_samples (fewer if short).

    Conditional runs give the samples' condition indices (n,); as in evaluate_policy, the headline metrics compare
    all samples with the data (h(x, c) with each sample's condition), and metrics["per_condition"][value] compares
    each condition's samples with that condition's data, for the conditions the samples hold."""
    metrics = _evaluate_batches(samples, conditions, dataset, reward, config)
    if conditions is None:
        return metrics
    held = [index for index in range(dataset.classes) if bool((conditions == index).any())]
    metrics["per_condition"] = _per_condition(dataset, held, lambda index: _evaluate_batches(
        samples[conditions == index], conditions[conditions == index], dataset, reward, config, index))
    return metrics


def _evaluate_batches(samples: torch.Tensor, conditions: Optional[torch.Tensor], dataset: Dataset, reward,
                      config: Config, condition: Optional[int] = None) -> dict[str, float]:
    """evaluate_given's metrics of samples (n, d) with their condition indices (n,) or None, against the data (of
    the condition index `condition` only, if given)."""
    k = config.eval.k
    if samples.shape[0] < k + 1:
        which = "" if condition is None else f" of condition {dataset.condition_values[condition]!r}"
        raise DistqError(f"{samples.shape[0]} samples{which}: the kNN KL needs at least eval.k + 1 = {k + 1}")
    n = min(config.eval.n_samples, samples.shape[0])
    batches = max(1, min(config.eval.batches, samples.shape[0] // n))
    starts = iter(range(0, n * batches, n))
    rows = slice(0, 0)

    def next_batch(size: int, generator: torch.Generator) -> torch.Tensor:
        nonlocal rows
        start = next(starts)
        rows = slice(start, start + size)
        return samples[rows]

    def rewarded(x: torch.Tensor) -> torch.Tensor:
        """h of the batch just taken (with its conditions, which evaluate_samples does not see)."""
        return reward(x) if conditions is None else reward(x, conditions[rows])

    project = principal_projection(dataset.points, config.eval.pca) if config.eval.pca else None
    metrics, used = evaluate_samples(next_batch, lambda m, g: dataset.reference(m, g, condition), rewarded, n,
                                     batches, k, _generator(config), lambda m, g: dataset.reference_pair(m, g, condition),
                                     project)
    metrics.update(per_reward(reward, used, None if conditions is None else conditions[:used.shape[0]]))
    return metrics
