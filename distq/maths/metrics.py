"""Evaluation metrics (section 11): kNN estimate of KL(generated || data), mean rewards and 95% CIs.

Pure functions: tensors in, Python floats out. KL is computed in float64 on the samples' device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from distq.errors import DistqError

# Rows of the distance matrix held at once: ~32 MB of float64, so n, m of a few thousand stay cheap.
_CHUNK_ELEMENTS = 2**22
# Coincident points have distance 0; clamping at this fraction of the data scale keeps the logs finite.
_RELATIVE_DISTANCE_FLOOR = 1e-12


def _check_knn_inputs(samples: torch.Tensor, reference: torch.Tensor, k: int) -> None:
    if samples.ndim != 2 or reference.ndim != 2 or samples.shape[1] != reference.shape[1]:
        raise DistqError(
            f"knn_kl needs samples (n, d) and reference (m, d); got {tuple(samples.shape)} and {tuple(reference.shape)}"
        )
    if k < 1 or samples.shape[0] < k + 1 or reference.shape[0] < k:
        raise DistqError(
            f"knn_kl needs k >= 1, n >= k + 1 samples and m >= k reference points; "
            f"got k={k}, n={samples.shape[0]}, m={reference.shape[0]}"
        )


def _kth_neighbour_distances(samples: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rho_k (to the k-th nearest *other* sample) and nu_k (to the k-th nearest reference point), both (n,).

    samples: (n, d), reference: (m, d). Rows are processed in chunks to bound memory.
    """
    n = samples.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(n, reference.shape[0]))
    rho, nu = [], []
    for start in range(0, n, chunk):
        rows = samples[start:start + chunk]
        # The matmul form of cdist loses precision for close points, exactly the ones kNN looks at.
        to_samples = torch.cdist(rows, samples, compute_mode="donot_use_mm_for_euclid_dist")
        own = torch.arange(rows.shape[0], device=rows.device)
        to_samples[own, own + start] = math.inf
        to_reference = torch.cdist(rows, reference, compute_mode="donot_use_mm_for_euclid_dist")
        # topk of a small k is several times faster than kthvalue on CPU; its values come sorted ascending.
        rho.append(to_samples.topk(k, dim=1, largest=False).values[:, -1])
        nu.append(to_reference.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(rho), torch.cat(nu)


def knn_kl(samples: torch.Tensor, reference: torch.Tensor, k: int = 1) -> float:
    """Wang-Kulkarni-Verdu (2009) kNN estimate of KL(samples' law || reference's law) (section 11).

    D = (d / n) sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1)); samples: (n, d), reference: (m, d).
    Distances are clamped at 1e-12 times the largest absolute coordinate, so duplicate points give a finite
    (but large, as the true KL of a point mass is infinite) value instead of inf or nan.
    """
    _check_knn_inputs(samples, reference, k)
    x = samples.detach().to(torch.float64)
    y = reference.detach().to(device=x.device, dtype=torch.float64)
    n, d = x.shape
    m = y.shape[0]
    scale = max(x.abs().max().item(), y.abs().max().item()) or 1.0
    rho, nu = _kth_neighbour_distances(x, y, k)
    floor = _RELATIVE_DISTANCE_FLOOR * scale
    log_ratio = torch.log(nu.clamp_min(floor)) - torch.log(rho.clamp_min(floor))
    return float(d * log_ratio.mean().item() + math.log(m / (n - 1)))


def mean_ci95(values) -> tuple[float, float]:
    """Mean and 95% CI half-width 1.96 * std(ddof=1) / sqrt(n) of a 1-D array, list or tensor of n values.

    A single value has no spread estimate: its half-width is nan.
    """
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if v.ndim != 1 or v.numel() == 0:
        raise DistqError(f"mean_ci95 needs a non-empty 1-D array; got shape {tuple(v.shape)}")
    n = v.numel()
    half_width = 1.96 * v.std(correction=1).item() / math.sqrt(n) if n > 1 else math.nan
    return float(v.mean().item()), float(half_width)


def evaluate_samples(
    generate: Callable[[int, torch.Generator], torch.Tensor],
    reference: Callable[[int, torch.Generator], torch.Tensor],
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    batches: int,
    k: int,
    generator: torch.Generator,
    reference_pair: Optional[Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]] = None,
    project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Reward and kNN KL of `batches` generated batches of n, with the estimator's floor (section 11).

    generate(n, generator) -> (n, d) samples; reference(n, generator) -> (n, d) fresh data; reward_fn (B, d) -> (B,).
    Each batch gives one KL (generated vs a fresh data batch) and one floor value (a fresh data batch vs
    another, same n and m; `reference_pair(n, generator)` supplies the two when they must be drawn jointly);
    `project` maps points to the space the KL is estimated in (e.g. principal components). Returns the metrics
    (reward_mean, reward_ci95 over all generated samples; kl_mean, kl_ci95, kl_floor, kl_floor_ci95 over batches;
    n_samples = n * batches) and the generated samples (n * batches, d).
    """
    if n < k + 1 or batches < 1:
        raise DistqError(f"evaluate_samples needs n >= k + 1 and batches >= 1; got n={n}, k={k}, batches={batches}")
    generated, rewards, kls, floors = [], [], [], []
    with torch.no_grad():
        for _ in range(batches):
            x = generate(n, generator)
            kl = lambda a, b: knn_kl(project(a), project(b), k) if project is not None else knn_kl(a, b, k)  # noqa: E731
            kls.append(kl(x, reference(n, generator)))
            floors.append(kl(*(reference_pair or (lambda m, g: (reference(m, g), reference(m, g))))(n, generator)))
            rewards.append(reward_fn(x).reshape(-1))
            generated.append(x.detach())
    reward_mean, reward_ci95 = mean_ci95(torch.cat(rewards))
    kl_mean, kl_ci95 = mean_ci95(kls)
    kl_floor, kl_floor_ci95 = mean_ci95(floors)
    metrics = {
        "reward_mean": reward_mean,
        "reward_ci95": reward_ci95,
        "kl_mean": kl_mean,
        "kl_ci95": kl_ci95,
        "kl_floor": kl_floor,
        "kl_floor_ci95": kl_floor_ci95,
        "n_samples": float(n * batches),
    }
    return metrics, torch.cat(generated)


def principal_projection(points: torch.Tensor, components: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (x - mean) V_p: coordinates in the span of the top `components` principal directions of points (N, d)."""
    mean = points.mean(0)
    _, _, vh = torch.linalg.svd(points - mean, full_matrices=False)
    basis = vh[:components].T
    return lambda x: (x - mean) @ basis
