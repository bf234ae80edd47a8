"""Calibration of the reward weight beta: the beta whose trained model reaches a target mean reward.

Under the tilt (E7) the mean reward grows with beta (its derivative is Var_beta(h) >= 0), so a bracket
r(lo) < target < r(hi) is found by doubling beta (or by probing beta = 0 below a start that overshoots), then
bisected until a probe lands within the tolerance. Each probe is a full training (distq.train.train) into
OUT/probe-NN; r(beta) is its evaluation's reward_mean. Learning and evaluation noise make r only nearly
monotone, so the tolerance should exceed the evaluation's reward CI (eval.n_samples x eval.batches samples).
No Ray here: probes run one after another in this process.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

from distq import rundir
from distq.config import Config
from distq.configfile import save_config
from distq.errors import DistqError
from distq.interrupt import Interrupted

Echo = Callable[[str], None]
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


def next_beta(probes: list[Probe], target: float, start: float) -> float:
    """The next beta to probe: `start`, then doubling until the target is bracketed, then the bracket's midpoint.

    Raises DistqError when the target is below the beta = 0 reward (beta >= 0 cannot lower the reward).
    """
    if not probes:
        return start
    above = [p.beta for p in probes if p.reward_mean > target]
    below = [p.beta for p in probes if p.reward_mean <= target]
    if not above:
        return 2 * max(below)
    hi = min(above)
    if hi == 0:
        zero = next(p for p in probes if p.beta == 0)
        raise DistqError(f"target reward {target:g} is below the beta = 0 model's reward {zero.reward_mean:.4g} "
                         f"(± {zero.reward_ci95:.2g}); a larger beta only raises the reward")
    lower = [b for b in below if b < hi]
    # No probe below hi under the target yet (noise can invert two probes): beta = 0 is the natural floor.
    return (max(lower) + hi) / 2 if lower else 0.0


def search_beta(measure: Callable[[float], Probe], target: float, tolerance: float, max_probes: int,
                start: float) -> tuple[list[Probe], bool]:
    """Probe betas (bracketing, then bisection) until one reaches target ± tolerance or max_probes are spent;
    -> (probes in order, reached)."""
    probes: list[Probe] = []
    while len(probes) < max_probes:
        probes.append(measure(next_beta(probes, target, start)))
        if abs(probes[-1].reward_mean - target) <= tolerance:
            return probes, True
    return probes, False


def _closest(probes: list[Probe], target: float) -> Probe:
    return min(probes, key=lambda p: abs(p.reward_mean - target))


def _with_beta(config: Config, beta: float) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, beta=beta))


def _write_report(out: Path, probes: list[Probe], target: float, tolerance: float, chosen: Probe,
                  reached: bool) -> None:
    rows = [{"probe": i, **dataclasses.asdict(p), "within_tolerance": abs(p.reward_mean - target) <= tolerance}
            for i, p in enumerate(probes)]
    rundir.write_table(out / TABLE, rows)
    verdict = "reached" if reached else "NOT reached"
    lines = [f"# beta calibration: target reward {target:g} ± {tolerance:g} ({verdict})", "",
             f"calibrated beta = {chosen.beta:.6g} (reward {chosen.reward_mean:.4f} ± {chosen.reward_ci95:.4f}, "
             f"KL {chosen.kl_mean:.4f} ± {chosen.kl_ci95:.4f})", "",
             "| probe | beta | reward | reward CI95 | KL | KL CI95 | run |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['beta']:.6g} | {r['reward_mean']:.4f} | {r['reward_ci95']:.4f} | "
              f"{r['kl_mean']:.4f} | {r['kl_ci95']:.4f} | {r['run_dir']} |"
              for r in sorted(rows, key=lambda r: r["beta"])]
    rundir.atomic_write(out / REPORT, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def _check_args(target: float, tolerance: float, max_probes: int, beta_start: Optional[float]) -> None:
    if not math.isfinite(target):
        raise DistqError(f"--target-reward must be a finite number, got {target}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise DistqError(f"--tolerance must be > 0, got {tolerance}")
    if max_probes < 1:
        raise DistqError(f"--max-probes must be >= 1, got {max_probes}")
    if beta_start is not None and not (beta_start > 0 and math.isfinite(beta_start)):
        raise DistqError(f"--beta-start must be > 0, got {beta_start}")


def calibrate(config: Config, target: float, out: str | Path, tolerance: float = 0.05, max_probes: int = 8,
              beta_start: Optional[float] = None, overwrite: bool = False, echo: Echo = print) -> dict[str, Any]:
    """Find beta with |reward_mean - target| <= tolerance; writes OUT/calibrated.yaml (the config with that beta),
    OUT/calibration.parquet and OUT/calibration.md (reward vs beta). DistqError if no probe gets there; OUT is locked
    throughout (and each probe's run directory while it trains)."""
    _check_args(target, tolerance, max_probes, beta_start)
    out = Path(out)
    if (out / TABLE).exists() and not overwrite:
        raise DistqError(f"{out} already holds a calibration ({TABLE}); pass --overwrite to replace it")
    with rundir.locked(out, "--out"):
        return _calibrate(config, target, out, tolerance, max_probes,
                          beta_start or (config.train.beta if config.train.beta > 0 else 1.0), echo)


def _calibrate(config: Config, target: float, out: Path, tolerance: float, max_probes: int, start: float,
               echo: Echo) -> dict[str, Any]:
    from distq.train import train

    def measure(beta: float) -> Probe:
        run_dir = out / f"probe-{len(probes_done):02d}"
        summary = train(_with_beta(config, beta), run_dir, overwrite=True, echo=lambda line: None)
        probe = Probe(beta, summary["reward_mean"], summary["reward_ci95"], summary["kl_mean"], summary["kl_ci95"],
                      str(run_dir))
        probes_done.append(probe)
        echo(f"probe {len(probes_done) - 1}: beta {beta:.6g} -> reward {probe.reward_mean:.4f} "
             f"± {probe.reward_ci95:.4f} | KL {probe.kl_mean:.4f} ± {probe.kl_ci95:.4f}")
        return probe

    probes_done: list[Probe] = []
    try:
        probes, reached = search_beta(measure, target, tolerance, max_probes, start)
    except Interrupted as stop:
        raise Interrupted(stop.signum, f"calibration stopped in probe {len(probes_done)}: {stop}") from None
    finally:
        if probes_done:
            chosen = _closest(probes_done, target)
            reached_now = abs(chosen.reward_mean - target) <= tolerance
            save_config(_with_beta(config, chosen.beta), out / CALIBRATED)
            _write_report(out, probes_done, target, tolerance, chosen, reached_now)
    echo(f"calibrated beta {chosen.beta:.6g}: reward {chosen.reward_mean:.4f} (target {target:g} ± {tolerance:g})\n"
         f"config: {out / CALIBRATED}\ntable: {out / REPORT}")
    if not reached:
        raise DistqError(f"no probe reached reward {target:g} ± {tolerance:g} in {max_probes} probes; the closest, "
                         f"beta {chosen.beta:.6g} (reward {chosen.reward_mean:.4f}), is in {out / CALIBRATED}; "
                         "raise --max-probes or --tolerance (or train longer)")
    return {"beta": chosen.beta, "reward_mean": chosen.reward_mean, "probes": probes, "config": out / CALIBRATED}
