"""When does q-learning beat weighting the data? Algorithm 1 beside reward-weighted dsm and the perfect learner.

    python scripts/yardstick.py                      # the three problems at full length: about 3 hours on 2 cores
    python scripts/yardstick.py --quick              # a tenth of the episodes, 5 evaluation batches (says so)
    python scripts/yardstick.py --problems gmm1d --set train.device=cuda

For each problem, q-learning (Algorithm 1) and weighted dsm (`train.algorithm: dsm` at beta > 0: denoising score
matching on the data drawn by exp(beta h), no RL) are trained from scratch with the same config, the same number of
episodes (one update each) and the same betas, and weighted dsm once more with q-learning's training time (METHODS);
the perfect learner (distq.training.evaluation.evaluate_perfect_learner: the exact score of the data's tilt, the optimum both
approximate) is evaluated at those betas. Every model is evaluated
with the sde on its training grid, the sde at twice the steps and ddim at 5 steps. results/yardstick.md gets, per
problem and sampler, each method's KL at the problem's target rewards (interpolated between the two betas whose
rewards bracket it), then every run with its wall time and weighted dsm's effective sample size. Runs are kept
under OUT/runs/ and an interrupted one continues (scripts/reproduce.py's `trained`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import ROOT, _ci, evaluate_on, kl_at_reward, on_grid, trained, trained_rollout  # noqa: E402

from distq.problems.data import load_dataset  # noqa: E402
from distq.problems.rewards import load_reward  # noqa: E402
from distq.setup.machine import describe_machine  # noqa: E402
from distq.training.evaluation import evaluate_perfect_learner  # noqa: E402


@dataclass(frozen=True)
class Problem:
    config: str
    betas: tuple[float, ...]
    episodes: int
    targets: tuple[float, ...]
    dsm_overrides: tuple[str, ...] = ()
    """What weighted dsm drops of the config's q-learning settings (its value network's)."""


PROBLEMS = {
    "swiss_roll": Problem("configs/swiss_roll_fine.yaml", (0.5, 1.0, 1.75, 2.5, 3.25), 20_000, (0.7, 0.8, 0.9)),
    "gmm1d": Problem("configs/gmm1d.yaml", (0.3, 0.6, 1.0, 1.5), 10_000, (-4.0, -3.5, -3.0)),
    "digits": Problem("configs/digits_three.yaml", (0.75, 1.5, 3.0, 6.0), 600, (0.3, 0.45, 0.6),
                      ("train.policy_gradient=td", "train.target_rate=0")),
}
"""The Swiss roll of Tables 3-4 (configs/swiss_roll_fine.yaml, rectangle reward), the 1D mixture of Figure 1
(reward -|x - 6|), and "make it a 3" on digits (reward P(digit = 3), q-learning's settings of docs/large-data.md)."""
METHODS = {"qlearning": "q-learning", "dsm": "weighted dsm", "dsm_same_time": "weighted dsm, q-learning's time"}
"""The trained methods. `dsm_same_time` is weighted dsm given q-learning's training time at the same beta: its
episodes are q-learning's times the ratio of the two runs' measured training rates (episodes_per_s of the same-updates
runs), so it needs those two first."""


def samplers(config) -> dict[str, tuple[str, float, int]]:
    """The evaluation cells: name -> (sampler, grid power, steps)."""
    steps, power = config.sde.num_steps, config.sde.grid_power
    return {f"sde, {steps} steps": ("sde", power, steps), f"sde, {2 * steps} steps": ("sde", power, 2 * steps),
            "ddim, 5 steps": ("ddim", power, 5)}


def _cells(evaluated: dict[str, dict]) -> str:
    """Reward / KL with their CIs, one table cell per evaluation."""
    return " | ".join(f"{_ci(m['reward_mean'], m['reward_ci95'])} / {_ci(m['kl_mean'], m['kl_ci95'])}"
                      for m in evaluated.values())


def problem_section(name: str, problem: Problem, args) -> str:
    """One problem's tables: KL at the targets per sampler and method, then every run."""
    episodes = args.episodes or (max(1, problem.episodes // 10) if args.quick else problem.episodes)
    runs: dict[str, list] = {method: [] for method in METHODS}
    for method in METHODS:
        for i, beta in enumerate(problem.betas):
            method_episodes = episodes
            if method == "dsm_same_time":
                rate = runs["dsm"][i][1]["episodes_per_s"] / runs["qlearning"][i][1]["episodes_per_s"]
                method_episodes = max(1, round(episodes * rate))
            algorithm = method.removesuffix("_same_time")
            config, run_dir, summary = trained(
                f"{name}_{method}_beta{beta:g}", problem.config,
                [*(problem.dsm_overrides if algorithm == "dsm" else ()), f"train.algorithm={algorithm}",
                 f"train.beta={beta}"], args, method_episodes)
            model = trained_rollout(config, run_dir)
            cells = {cell: evaluate_on(model, config, *spec) for cell, spec in samplers(config).items()}
            runs[method].append((beta, summary, cells))
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    perfect = []
    for beta in problem.betas:
        cells = {}
        for cell, (sampler, power, steps) in samplers(config).items():
            cell_config = on_grid(config, sampler, power, steps)
            cell_config = dataclasses.replace(cell_config, train=dataclasses.replace(cell_config.train, beta=beta))
            cells[cell] = evaluate_perfect_learner(cell_config, dataset, reward, sampler)
        perfect.append((beta, cells))
    header = ("| sampler | method | " + " | ".join(f"KL at reward {t:g}" for t in problem.targets) + " |\n|---|---|"
              + "---|" * len(problem.targets))
    rows = [header]
    for cell in samplers(config):
        sweeps = {label: [c[cell] for _, _, c in runs[method]] for method, label in METHODS.items()}
        sweeps["perfect learner"] = [c[cell] for _, c in perfect]
        for label, metrics in sweeps.items():
            points = [(m["reward_mean"], m["kl_mean"]) for m in metrics]
            kls = [kl_at_reward(points, target) for target in problem.targets]
            rows.append(f"| {cell} | {label} | " + " | ".join("not bracketed" if kl is None else f"{kl:.3f}"
                                                               for kl in kls) + " |")
    cells = list(samplers(config))
    detail = ["| method | beta | " + " | ".join(f"{cell}: reward / KL" for cell in cells)
              + " | episodes | wall time | ESS of the weights |", "|---|---|" + "---|" * (len(cells) + 3)]
    for method, label in METHODS.items():
        for beta, summary, evaluated in runs[method]:
            ess = f"{summary['ess']:.0f} of {dataset.points.shape[0]}" if "ess" in summary else "-"
            detail.append(f"| {label} | {beta:g} | {_cells(evaluated)} | {summary['episodes']:,} | "
                          f"{summary['wall_s']:.0f} s | {ess} |")
    for beta, evaluated in perfect:
        detail.append(f"| perfect learner | {beta:g} | {_cells(evaluated)} | - | - | - |")
    return (f"## {name}: `{problem.config}`, {episodes:,} episodes per run (weighted dsm at q-learning's time: more)\n\n" + "\n".join(rows) +
            "\n\nThe runs (reward and KL with 95% CIs; KL at a reward interpolates between the two betas whose rewards "
            "bracket it):\n\n" + "\n".join(detail) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=tuple(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--quick", action="store_true", help="a tenth of the episodes and 5 evaluation batches")
    parser.add_argument("--episodes", type=int,
                        help="episodes of every same-updates run (default: the problem's; --quick a tenth of it)")
    parser.add_argument("--eval-batches", type=int, help="evaluation batches (default 20; --quick 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="output directory (default results/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the script's own; repeatable")
    args = parser.parse_args(argv)
    args.command = "python scripts/yardstick.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.eval_batches = args.eval_batches or (5 if args.quick else 20)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "**QUICK: a tenth of each problem's episodes**" if args.quick else "full length"
    text = ("# Weighted dsm, q-learning and the perfect learner\n\n"
            f"{mode}, eval {args.eval_batches} batches. Command: `{args.command}`. Hardware: {describe_machine()}.\n\n"
            + "\n".join(problem_section(name, PROBLEMS[name], args) for name in args.problems))
    target = args.out / ("yardstick_quick.md" if args.quick else "yardstick.md")
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
