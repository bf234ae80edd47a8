"""What a perfect learner of Algorithm 1 reaches: the reverse process driven by the exact tilted ratio score.

    python scripts/floor.py [--config configs/swiss_roll.yaml] [--powers 1 2] [--bandwidths 0 0.5] [--betas 0 1.4]
                            [--set KEY=VALUE ...] [--sampler heun|dpmpp_2m|...] [--name floor.json]

For each cell (sde.grid_power, ratio.bandwidth, train.beta) the action at every step is distq.maths.ratio.tilted_ratio_score
with log-weights beta h(x0_i): the optimal policy's mean (E10) for the tilt (E7) of the training data, on the run's
grid and sampler, with the run's ratio bandwidth (distq.training.evaluation.evaluate_perfect_learner). Its samples are
evaluated like a trained run's: eval.batches batches of eval.n_samples against fresh data. A learned policy
is judged against this number for the same cell: the gap above it is the learner's, the floor itself the
sampler's and the 300 data points'. Writes benchmarks/NAME.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distq.problems.data import load_dataset  # noqa: E402
from distq.problems.rewards import load_reward  # noqa: E402
from distq.setup.config import GENERATION_SAMPLERS, Config  # noqa: E402
from distq.setup.configfile import load_config  # noqa: E402
from distq.training.evaluation import evaluate_perfect_learner  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks"


def floor_cell(config: Config, sampler: Optional[str] = None) -> dict[str, float]:
    """Reward and KL (with CIs and the KL estimator's own floor) of the perfect learner for one config (with
    `sampler`, which may be a generation-only one, instead of sde.sampler)."""
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points, standardization=dataset.standardization)
    metrics = evaluate_perfect_learner(config, dataset, reward, sampler)
    return {key: round(metrics[key], 4) for key in ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95", "kl_floor")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/swiss_roll.yaml")
    parser.add_argument("--powers", type=float, nargs="+", default=[1.0, 2.0], help="sde.grid_power values")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[0.0, 0.5], help="ratio.bandwidth values")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.4], help="train.beta values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further config override for every cell, e.g. --set sde.dt=0.1 (repeatable)")
    parser.add_argument("--sampler", choices=GENERATION_SAMPLERS,
                        help="sampler (default: the config's sde.sampler; also heun or dpmpp_2m)")
    parser.add_argument("--name", default="floor.json", help="output file under benchmarks/")
    args = parser.parse_args()
    cells = []
    for power, bandwidth, beta in itertools.product(args.powers, args.bandwidths, args.betas):
        config = load_config(args.config, [*args.overrides, f"sde.grid_power={power}", f"ratio.bandwidth={bandwidth}",
                                           f"train.beta={beta}"])
        cell = {"grid_power": power, "bandwidth": bandwidth, "beta": beta, **floor_cell(config, args.sampler)}
        print(json.dumps(cell), flush=True)
        cells.append(cell)
    OUT.mkdir(exist_ok=True)
    path = OUT / args.name
    result = {"setting": f"{args.config} {' '.join(args.overrides)}: perfect learner (exact tilted ratio score), "
                         "eval as configured", "command": "python scripts/floor.py " + " ".join(sys.argv[1:]),
              "cells": cells}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
