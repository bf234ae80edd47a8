"""Regenerate the paper's figures and tables with distq, side by side with the paper's numbers (algorithm.md 12).

    python scripts/reproduce.py --quick      # about 10 minutes on 2 cores, 3,000 episodes per run (says so)
    python scripts/reproduce.py              # the paper's 50,000 episodes per run: hours; resumable

Writes results/figure1.md (1D mixture, beta 0 / 0.1 / 1, against the closed-form tilt), results/figure3.md
(Swiss roll, several beta), results/tables5_6.md (sde / ode_euler / ddim at 50 / 10 / 5 steps, beta = 0 and the
reward-directed model), the runs' sample plots as PNG, and the exact command. Each training is a run directory
under results/runs/; a finished one (summary.json present) is not trained again, so an interrupted reproduction
continues where it stopped. Not yet here: Tables 3-4 (fine-tuning from pretrained models A and B).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distq.checkpoint import load_checkpoint  # noqa: E402
from distq.components import build_rollout, make_grid  # noqa: E402
from distq.config import Config, load_config  # noqa: E402
from distq.data import load_dataset  # noqa: E402
from distq.evaluation import evaluate_policy  # noqa: E402
from distq.rewards import load_reward  # noqa: E402
from distq.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLE5 = {"ddim": (0.14, 0.15, 0.72), "ode_euler": (0.11, 0.23, 0.56), "sde": (0.18, 0.35, 0.83)}
PAPER_TABLE6 = {"ddim": (0.50, 0.61, 1.22), "ode_euler": (0.62, 0.72, 1.07), "sde": (0.24, 0.77, 1.29)}
STEPS = (50, 10, 5)


def right_mode_mass(beta: float) -> float:
    """Closed-form tilt (E7) of 0.5 N(-2, 1) + 0.5 N(2, 1) by exp(beta x) (h = -|x - 6|, linear below 6): the right
    component's weight e^{2 beta} / (e^{2 beta} + e^{-2 beta})."""
    return 1.0 / (1.0 + math.exp(-4.0 * beta))


def trained(name: str, config_file: str, overrides: list[str], args) -> tuple[Config, Path, dict]:
    """A finished run (trained now unless its summary.json exists): its config, directory and summary."""
    run_dir = args.out / "runs" / name
    config = load_config(ROOT / config_file, [*overrides, f"train.episodes={args.episodes}",
                                              f"eval.batches={args.eval_batches}", "train.progress_seconds=60"])
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        print(f"{name}: finished earlier, kept", flush=True)
        return config, run_dir, json.loads(summary_path.read_text())
    print(f"{name}: training {args.episodes} episodes", flush=True)
    return config, run_dir, train(config, run_dir, overwrite=True, echo=lambda line: print(f"  {line}", flush=True))


def _ci(mean: float, half: float) -> str:
    return f"{mean:.3f} +- {half:.3f}"


def figure1(args) -> str:
    rows = ["| beta | right-mode mass (x > 0) | closed-form tilt | mean reward | KL to the data | KL floor |",
            "|---|---|---|---|---|---|"]
    for beta in (0.0, 0.1, 1.0):
        config, run_dir, summary = trained(f"gmm1d_beta{beta:g}", "configs/gmm1d.yaml", [f"train.beta={beta}"], args)
        samples = torch.tensor(pq.read_table(run_dir / "samples.parquet").column("x0").to_numpy())
        rows.append(f"| {beta:g} | {float((samples > 0).float().mean()):.3f} | {right_mode_mass(beta):.3f} | "
                    f"{_ci(summary['reward_mean'], summary['reward_ci95'])} | {_ci(summary['kl_mean'], summary['kl_ci95'])} "
                    f"| {summary['kl_floor']:.3f} |")
        shutil.copy(run_dir / "samples.png", args.out / f"figure1_beta{beta:g}.png")
    return ("# Figure 1: 1D Gaussian mixture, reward -|x - 6|\n\n" + _header(args) +
            "The paper's figure is qualitative: at beta = 0.1 more samples near the right mode, at beta = 1 samples "
            "closer to 6. The closed-form tilt gives the right mode's mass.\n\n" + "\n".join(rows) +
            "\n\nPlots: " + ", ".join(f"figure1_beta{b:g}.png" for b in (0.0, 0.1, 1.0)) + "\n")


def figure3(args) -> tuple[str, dict]:
    rows = ["| beta | mean reward | KL to the data | KL floor |", "|---|---|---|---|"]
    models = {}
    for beta in (0.0, 1.0, 2.25, 4.0):
        config, run_dir, summary = trained(f"swiss_roll_beta{beta:g}", "configs/swiss_roll.yaml",
                                           [f"train.beta={beta}"], args)
        models[beta] = (config, run_dir, summary)
        rows.append(f"| {beta:g} | {_ci(summary['reward_mean'], summary['reward_ci95'])} | "
                    f"{_ci(summary['kl_mean'], summary['kl_ci95'])} | {summary['kl_floor']:.3f} |")
        shutil.copy(run_dir / "samples.png", args.out / f"figure3_beta{beta:g}.png")
    text = ("# Figure 3: Swiss roll, rectangle reward, several beta\n\n" + _header(args) + "\n".join(rows) +
            "\n\nPlots: " + ", ".join(f"figure3_beta{b:g}.png" for b in models) + "\n")
    return text, models


def tables5_6(args, models: dict) -> str:
    sections = []
    for beta, paper, title in ((0.0, PAPER_TABLE5, "Table 5: beta = 0"),
                               (2.25, PAPER_TABLE6, "Table 6: reward-directed (the paper's reward 0.8)")):
        config, run_dir, summary = models[beta]
        dataset = load_dataset(config.data, config.seed)
        reward = load_reward(config.reward, dataset.points[:8])
        rollout = build_rollout(config, dataset.points, reward)
        rollout.set_weights(load_checkpoint(run_dir / "checkpoint.pt")["learner"]["policy"])
        rows = ["| sampler | " + " | ".join(f"{k} steps: KL (paper) / reward" for k in STEPS) + " |",
                "|---|" + "---|" * len(STEPS)]
        for sampler, numbers in paper.items():
            cells = []
            for steps, paper_kl in zip(STEPS, numbers):
                metrics = evaluate_policy(rollout, dataset, reward, config, make_grid(config, steps), sampler)[0]
                cells.append(f"{_ci(metrics['kl_mean'], metrics['kl_ci95'])} ({paper_kl}) / {metrics['reward_mean']:.3f}")
            rows.append(f"| {sampler} | " + " | ".join(cells) + " |")
        sections.append(f"## {title}\n\nModel: `{run_dir.relative_to(args.out.parent)}` (beta = {beta:g}, trained with "
                        f"{config.sde.sampler} at {config.sde.num_steps} steps; reward {summary['reward_mean']:.3f})."
                        "\n\n" + "\n".join(rows))
    return ("# Tables 5-6: samplers and step counts (the same trained policy, evaluated on other grids)\n\n" +
            _header(args) + "\n\n".join(sections) + "\n")


def _header(args) -> str:
    mode = (f"**QUICK: {args.episodes:,} episodes per run (the paper: 50,000), eval {args.eval_batches} batches of 300**"
            if args.episodes < 50_000 else f"{args.episodes:,} episodes per run, eval {args.eval_batches} batches of 300")
    return f"{mode}. Command: `{args.command}`. Hardware: the machine that ran it.\n\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3,000 episodes and 5 evaluation batches per run")
    parser.add_argument("--episodes", type=int, help="episodes per run (default 50,000; --quick 3,000)")
    parser.add_argument("--eval-batches", type=int, help="evaluation batches (default 20; --quick 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="output directory (default results/)")
    args = parser.parse_args(argv)
    args.command = "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.episodes = args.episodes or (3000 if args.quick else 50_000)
    args.eval_batches = args.eval_batches or (5 if args.quick else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figure1.md").write_text(figure1(args))
    text, models = figure3(args)
    (args.out / "figure3.md").write_text(text)
    (args.out / "tables5_6.md").write_text(tables5_6(args, models))
    print(f"wrote {args.out}/figure1.md, figure3.md, tables5_6.md and the plots")


if __name__ == "__main__":
    main()
