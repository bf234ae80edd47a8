"""Calibration of the reward weight beta: the beta whose trained model reaches a target mean reward, or the one
with the most reward whose KL to the data stays within a budget.

Under the tilt (E7) the mean reward grows with beta (its derivative is Var_beta(h) >= 0), and so does the KL to
the data (d KL / d beta = beta Var_beta(h) >= 0), so a bracket m(lo) < target < m(hi) of the measured quantity m
(reward_mean, or kl_mean for a budget) is found by doubling beta (or by probing beta = 0 below a start that
overshoots), then bisected until a probe lands within the tolerance (for a KL budget K: K - tolerance <= KL <= K,
the most reward the budget allows up to the tolerance). Each probe is a full training (distq.training.trainer.Trainer)
into OUT/probe-NN; r(beta) is its evaluation's reward_mean. Learning and evaluation noise make r only nearly
monotone, so the tolerance should exceed the evaluation's reward CI (eval.n_samples x eval.batches samples).
No Ray here: probes run one after another in this process.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

from distq.errors import DistqError
from distq.runs import rundir
from distq.runs.interrupt import Interrupted
from distq.runs.progress import Echo
from distq.runs.rundir import save_config
from distq.setup.config import Config

CALIBRATED, TABLE, REPORT = "calibrated.yaml", "calibration.parquet", "calibration.md"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One training at a given beta and its evaluation."""

    beta: float
    reward_mean: float
    reward_ci95: float = math.nan
    kl_mean: float = math.nan
    kl_ci95: float = math.nan
    run_dir: str = ""
    kl_floor: float = math.nan
    """The kNN KL estimator's floor (fresh data against data): the scale of its bias."""


METRICS = {"reward_mean": "reward", "kl_mean": "KL"}
"""What calibration aims at: a target reward, or a KL budget."""


def _value(probe: Probe, metric: str) -> float:
    return getattr(probe, metric)


def next_beta(probes: list[Probe], target: float, start: float, metric: str = "reward_mean") -> float:
    """The next beta to probe: `start`, then doubling until the target of `metric` (reward_mean or kl_mean) is
    bracketed, then the bracket's midpoint.

    Raises DistqError when the target is below the beta = 0 value (beta >= 0 lowers neither reward nor KL).
    """
    if not probes:
        return start
    above = [p.beta for p in probes if _value(p, metric) > target]
    below = [p.beta for p in probes if _value(p, metric) <= target]
    if not above:
        return 2 * max(below)
    hi = min(above)
    if hi == 0:
        zero, name = next(p for p in probes if p.beta == 0), METRICS[metric]
        what = f"target reward {target:g}" if metric == "reward_mean" else f"KL budget {target:g}"
        raise DistqError(f"{what} is below the beta = 0 model's {name} {_value(zero, metric):.4g} "
                         f"(± {getattr(zero, metric.replace('_mean', '_ci95')):.2g}); a larger beta only raises "
                         f"the {name}")
    lower = [b for b in below if b < hi]
    # No probe below hi under the target yet (noise can invert two probes): beta = 0 is the natural floor.
    return (max(lower) + hi) / 2 if lower else 0.0


def reaches(probe: Probe, target: float, tolerance: float, metric: str = "reward_mean") -> bool:
    """reward_mean within target ± tolerance; kl_mean within [target - tolerance, target] (inside the budget)."""
    value = _value(probe, metric)
    return abs(value - target) <= tolerance if metric == "reward_mean" else target - tolerance <= value <= target


def search_beta(measure: Callable[[float], Probe], target: float, tolerance: float, max_probes: int,
                start: float, metric: str = "reward_mean") -> tuple[list[Probe], bool]:
    """Probe betas (bracketing, then bisection) until one reaches the target (`reaches`) or max_probes are spent;
    -> (probes in order, reached)."""
    probes: list[Probe] = []
    while len(probes) < max_probes:
        probes.append(measure(next_beta(probes, target, start, metric)))
        if reaches(probes[-1], target, tolerance, metric):
            return probes, True
    return probes, False


def chosen_probe(probes: list[Probe], target: float, metric: str = "reward_mean") -> Probe:
    """The calibration's answer: the probe closest to the target reward; for a KL budget, the one with the most
    reward within the budget (none within: the least KL)."""
    if metric == "reward_mean":
        return min(probes, key=lambda p: abs(p.reward_mean - target))
    within = [p for p in probes if p.kl_mean <= target]
    return max(within, key=lambda p: p.reward_mean) if within else min(probes, key=lambda p: p.kl_mean)


def _with_beta(config: Config, beta: float) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, beta=beta))


def _goal(target: float, tolerance: float, metric: str) -> str:
    return (f"reward {target:g} ± {tolerance:g}" if metric == "reward_mean"
            else f"KL budget {target:g} (KL in [{target - tolerance:g}, {target:g}])")


def _write_report(out: Path, probes: list[Probe], target: float, tolerance: float, chosen: Probe,
                  reached: bool, metric: str) -> None:
    rows = [{"probe": i, **dataclasses.asdict(p), "within_tolerance": reaches(p, target, tolerance, metric)}
            for i, p in enumerate(probes)]
    rundir.write_table(out / TABLE, rows)
    verdict = "reached" if reached else "NOT reached"
    lines = [f"# beta calibration: target {_goal(target, tolerance, metric)} ({verdict})", "",
             f"calibrated beta = {chosen.beta:.6g} (reward {chosen.reward_mean:.4f} ± {chosen.reward_ci95:.4f}, "
             f"KL {chosen.kl_mean:.4f} ± {chosen.kl_ci95:.4f})", "",
             "| probe | beta | reward | reward CI95 | KL | KL CI95 | run |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['beta']:.6g} | {r['reward_mean']:.4f} | {r['reward_ci95']:.4f} | "
              f"{r['kl_mean']:.4f} | {r['kl_ci95']:.4f} | {r['run_dir']} |"
              for r in sorted(rows, key=lambda r: r["beta"])]
    rundir.atomic_write(out / REPORT, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def _check_args(target: float, tolerance: float, max_probes: int, beta_start: Optional[float], metric: str) -> None:
    if metric == "reward_mean" and not math.isfinite(target):
        raise DistqError(f"--target-reward must be a finite number, got {target}")
    if metric == "kl_mean" and not (target > 0 and math.isfinite(target)):
        raise DistqError(f"--target-kl must be a positive number, got {target}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise DistqError(f"--tolerance must be > 0, got {tolerance}")
    if max_probes < 1:
        raise DistqError(f"--max-probes must be >= 1, got {max_probes}")
    if beta_start is not None and not (beta_start > 0 and math.isfinite(beta_start)):
        raise DistqError(f"--beta-start must be > 0, got {beta_start}")


def calibrate(config: Config, target: float, out: str | Path, tolerance: float = 0.05, max_probes: int = 8,
              beta_start: Optional[float] = None, overwrite: bool = False, echo: Echo = print,
              metric: str = "reward_mean") -> dict[str, Any]:
    """Find beta with |reward_mean - target| <= tolerance (metric reward_mean) or, for the KL budget `target`
    (metric kl_mean), target - tolerance <= kl_mean <= target; writes OUT/calibrated.yaml (the config with that
    beta), OUT/calibration.parquet and OUT/calibration.md (reward and KL vs beta). DistqError if no probe gets there;
    OUT is locked throughout (and each probe's run directory while it trains)."""
    _check_args(target, tolerance, max_probes, beta_start, metric)
    out = Path(out)
    if (out / TABLE).exists() and not overwrite:
        raise DistqError(f"{out} already holds a calibration ({TABLE}); pass --overwrite to replace it")
    with rundir.locked(out, "--out"):
        return _calibrate(config, target, out, tolerance, max_probes,
                          beta_start or (config.train.beta if config.train.beta > 0 else 1.0), echo, metric)


def _calibrate(config: Config, target: float, out: Path, tolerance: float, max_probes: int, start: float,
               echo: Echo, metric: str) -> dict[str, Any]:
    from distq.training.trainer import train

    def measure(beta: float) -> Probe:
        run_dir = out / f"probe-{len(probes_done):02d}"
        summary = train(_with_beta(config, beta), run_dir, overwrite=True, echo=lambda line: None)
        probe = Probe(beta, summary["reward_mean"], summary["reward_ci95"], summary["kl_mean"], summary["kl_ci95"],
                      str(run_dir), summary["kl_floor"])
        probes_done.append(probe)
        echo(f"probe {len(probes_done) - 1}: beta {beta:.6g} -> reward {probe.reward_mean:.4f} "
             f"± {probe.reward_ci95:.4f} | KL {probe.kl_mean:.4f} ± {probe.kl_ci95:.4f}")
        return probe

    probes_done: list[Probe] = []
    try:
        probes, reached = search_beta(measure, target, tolerance, max_probes, start, metric)
    except Interrupted as stop:
        raise Interrupted(stop.signum, f"calibration stopped in probe {len(probes_done)}: {stop}") from None
    finally:
        if probes_done:
            chosen = chosen_probe(probes_done, target, metric)
            save_config(_with_beta(config, chosen.beta), out / CALIBRATED)
            _write_report(out, probes_done, target, tolerance, chosen, reaches(chosen, target, tolerance, metric),
                          metric)
    echo(f"calibrated beta {chosen.beta:.6g}: reward {chosen.reward_mean:.4f}, KL {chosen.kl_mean:.4f} (target "
         f"{_goal(target, tolerance, metric)})\nconfig: {out / CALIBRATED}\ntable: {out / REPORT}")
    if not reached:
        raise DistqError(f"no probe reached {_goal(target, tolerance, metric)} in {max_probes} probes; the closest, "
                         f"beta {chosen.beta:.6g} (reward {chosen.reward_mean:.4f}, KL {chosen.kl_mean:.4f}), is in "
                         f"{out / CALIBRATED}; raise --max-probes or --tolerance (or train longer)")
    return {"beta": chosen.beta, "reward_mean": chosen.reward_mean, "kl_mean": chosen.kl_mean, "probes": probes,
            "config": out / CALIBRATED}
