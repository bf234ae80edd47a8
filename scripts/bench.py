"""Benchmarks, written as JSON under benchmarks/ and quoted by the README and docs/.

    python scripts/bench.py core      # paper-scale speed, side by side: distq vs a plain torch loop, 1 vs 2 threads,
                                      # and distq with train.processes = 2
    python scripts/bench.py quality   # paper-scale Swiss roll runs (beta = 0 and reward-directed): KL and reward
    python scripts/bench.py parallel  # side by side: in-process (1, 2 processes), Ray rollout actors (sync, async W = 2)
                                      # and ddp (W = 1, 2) at paper scale, rollout-bound and digits; all-reduce cost
    python scripts/bench.py rllib     # env steps/s: distq's batched rollout vs RLlib's env runner on the same MDP
    python scripts/bench.py ratio     # bias and variance of the running reward for each ratio.method, m and k
    python scripts/bench.py scale     # episodes/s and peak memory as N, d and B grow, per ratio method (+ scale.png)
    python scripts/bench.py scale-large  # only scale's minibatch N = 10^5 vs 10^6 comparison
    python scripts/bench.py tune      # sweep efficiency: a 2-trial sweep vs its trials as plain runs side by side
                                      # (--checkouts DIR ...: other distq checkouts, e.g. git worktrees, beside it)

Speed figures are measured in one process, alternating the variants in rounds so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distq.setup.machine import machine  # noqa: E402
from scripts.benchmarking.parallel import SETTINGS as PARALLEL_SETTINGS  # noqa: E402
from scripts.benchmarking.parallel import bench_parallel, bench_rllib
from scripts.benchmarking.quality import bench_quality  # noqa: E402
from scripts.benchmarking.ratio import (_scale_cell, bench_large_minibatch, bench_ratio, bench_scale,  # noqa: E402
                                        plot_scale)
from scripts.benchmarking.speed import bench_core  # noqa: E402
from scripts.benchmarking.tuning import bench_tune  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) == 3 and sys.argv[1] == "_scale_cell":  # one cell of `scale`, in its own process
        print(json.dumps(_scale_cell(json.loads(sys.argv[2]))))
        return
    parser.add_argument("what", choices=("core", "quality", "parallel", "rllib", "ratio", "scale", "scale-large", "scale-plot",
                                         "tune"), nargs="?",
                        default="core")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=None, help="episodes per round (rllib: env steps per round)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.5])
    parser.add_argument("--settings", nargs="+", choices=tuple(PARALLEL_SETTINGS), default=tuple(PARALLEL_SETTINGS),
                        help="parallel: which settings to run")
    parser.add_argument("--checkouts", nargs="+", type=Path, default=None,
                        help="tune: distq checkouts to compare, e.g. a git worktree of an older commit (default: this one)")
    parser.add_argument("--name", help="output file name under benchmarks/ (default: WHAT.json)")
    parser.add_argument("--config", default="configs/swiss_roll.yaml",
                        help="quality: the runs' config (default configs/swiss_roll.yaml, the paper's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for quality runs, e.g. --set sde.dt=0.1 (repeatable)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.what == "core":
        result = bench_core(args.rounds, args.episodes or 100)
    elif args.what == "parallel":
        result = bench_parallel(args.rounds, args.episodes, args.settings)
    elif args.what == "tune":
        result = bench_tune(args.rounds, args.episodes, args.checkouts or (OUT.parent,))
    elif args.what == "rllib":
        result = bench_rllib(args.rounds, args.episodes or 4000)
    elif args.what == "ratio":
        result = bench_ratio(args.rounds)
    elif args.what == "scale-plot":  # re-plot benchmarks/scale.json
        plot_scale(json.loads((OUT / "scale.json").read_text()), OUT / "scale.png")
        print(f"wrote {OUT / 'scale.png'}")
        return
    elif args.what == "scale-large":  # only the N = 10^6 minibatch comparison of `scale`
        result = bench_large_minibatch()
    elif args.what == "scale":
        result = bench_scale()
        plot_scale(result, OUT / "scale.png")
    else:
        result = bench_quality(args.config, args.episodes or 50000, args.betas, args.overrides)
    result["machine"] = {**machine(), "command": "python scripts/bench.py " + " ".join(sys.argv[1:])}
    path = OUT / (args.name or f"{args.what}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
