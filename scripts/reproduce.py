"""Regenerate the paper's figures and tables with distq, side by side with the paper's numbers (algorithm.md 12).

    python scripts/reproduce.py --quick      # about 10 minutes on 2 cores, 3,000 episodes per run (says so)
    python scripts/reproduce.py              # the paper's 50,000 episodes per run: hours; resumable
    python scripts/reproduce.py --set train.device=cuda   # any config override, for every run

Writes results/figure1.md (1D mixture, beta 0 / 0.1 / 1, against the closed-form tilt), results/figure3.md (Swiss
roll, several beta), results/tables3_4.md (fine-tuning pretrained models A and B with DDPO, DPOK, q-learning and, as
the no-RL yardstick, reward-weighted dsm: KL at reward 0.7 / 0.8 / 0.9 from a beta sweep per method),
results/tables5_6.md (sde / ode_euler / ddim at 50 / 10 / 5 steps, beta = 0 and the reward-directed model, an
ablation of time grids against the perfect learner and one of a learned time embedding), the runs' sample plots as
PNG, and the exact command. Each training is a run directory
under results/runs/; a finished one (summary.json present) is not trained again and an interrupted one continues
from its last checkpoint, so an interrupted reproduction continues where it stopped.

Over 300 lines: one section per figure or table of the paper, sharing the kept-run and evaluation helpers that
scripts/yardstick.py also imports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distq.algorithms.learner import deployed_policy  # noqa: E402
from distq.backends.build import build_rollout, make_grid  # noqa: E402
from distq.errors import DistqError  # noqa: E402
from distq.problems.data import load_dataset  # noqa: E402
from distq.problems.rewards import load_reward  # noqa: E402
from distq.runs.checkpoint import load_checkpoint  # noqa: E402
from distq.setup.config import SAMPLERS, Config  # noqa: E402
from distq.setup.configfile import load_config  # noqa: E402
from distq.setup.machine import describe_machine  # noqa: E402
from distq.training.evaluation import evaluate_perfect_learner, evaluate_policy  # noqa: E402
from distq.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLE5 = {"ddim": (0.14, 0.15, 0.72), "ode_euler": (0.11, 0.23, 0.56), "sde": (0.18, 0.35, 0.83)}
PAPER_TABLE6 = {"ddim": (0.50, 0.61, 1.22), "ode_euler": (0.62, 0.72, 1.07), "sde": (0.24, 0.77, 1.29)}
STEPS = (50, 10, 5)
PAPER_TABLE3 = {"pretrained": (0.52, 0.17), "ddpo_sf": (1.00, 2.97), "dpok": (0.21, 0.38, 0.69),
                "qlearning": (0.29, 0.39, 0.66)}
PAPER_TABLE4 = {"pretrained": (0.55, 0.68), "dpok": (0.90, 1.03, 1.21), "qlearning": (0.30, 0.42, 0.64)}
TARGETS = (0.7, 0.8, 0.9)
TILT_FLOOR = (0.08, 0.19, 0.37)
"""The least KL of any law with mean rectangle reward 0.7 / 0.8 / 0.9 from the data (its exponential tilt,
algorithm.md section 13), before any sampler error."""
FINETUNE_BETAS = {"qlearning": (0.75, 1.5, 2.25, 3.0, 4.5), "dpok": (0.005, 0.01, 0.02, 0.04),
                  "dsm": (0.75, 1.5, 2.25, 3.0, 4.5)}
"""dpok with Adam is invariant to the scale of beta h alone: what counts is beta against train.kl_weight (0.01), and
the KL-regularised optimum is the tilt by exp(beta h / kl_weight). dsm at beta > 0 (weighted dsm) trains on the data
weighted by exp(beta h), whose optimum is q-learning's tilt: the same betas."""
METHOD_LABELS = {"dsm": "weighted dsm"}
"""A method's name in the tables, where it is not its train.algorithm; the paper has no numbers for weighted dsm."""
FINE_CONFIG = "configs/swiss_roll_fine.yaml"
"""Tables 3-4 and the grid ablation run every method on the finer grid, smoothed ratio estimator and wider networks
(docs/results.md), whose perfect-learner KL at reward 0.8 is below the paper's; models A and B
are trained on it too."""
GRID_POWERS = (1.0, 1.5, 2.0)
FINER_SAMPLING_STEPS = 40
"""Tables 3-4 also evaluate every run with the sde at 40 steps, twice its training grid's 20: the policy and value
are functions of continuous time, and the finer grid's smaller discretisation error lowers KL at equal reward."""
SECOND_ORDER = ("heun", "dpmpp_2m")  # generation-only samplers of the ablations
TIME_FREQUENCIES = 16
EMBEDDING = (f"model.time_frequencies={TIME_FREQUENCIES}",)
"""Tables 3-4's models A and B, and so every fine-tuning of them, see a learned time embedding: with it and 40
sampling steps, q-learning from scratch reaches KL 0.25-0.27 at reward 0.8 (benchmarks/finer_sampling.md). The
ablations compare it with the paper's tau / T input."""
EMBEDDING_GRID_POWERS = (1.5, 2.0)


def right_mode_mass(beta: float) -> float:
    """Closed-form tilt (E7) of 0.5 N(-2, 1) + 0.5 N(2, 1) by exp(beta x) (h = -|x - 6|, linear below 6): the right
    component's weight e^{2 beta} / (e^{2 beta} + e^{-2 beta})."""
    return 1.0 / (1.0 + math.exp(-4.0 * beta))


def trained(name: str, config_file: str, overrides: list[str], args,
            episodes: Optional[int] = None) -> tuple[Config, Path, dict]:
    """A finished run of `episodes` (default args.episodes), trained now unless its summary.json exists: its config,
    directory and summary."""
    run_dir = args.out / "runs" / name
    episodes = episodes or args.episodes
    config = load_config(ROOT / config_file, [*overrides, f"train.episodes={episodes}",
                                              f"eval.batches={args.eval_batches}", "train.progress_seconds=60",
                                              *args.set])
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        if load_config(run_dir / "config.yaml") == config:
            print(f"{name}: finished earlier, kept", flush=True)
            return config, run_dir, json.loads(summary_path.read_text())
        print(f"{name}: finished earlier with another config", flush=True)
    echo = lambda line: print(f"  {line}", flush=True)  # noqa: E731
    if (run_dir / "checkpoint.pt").is_file():  # interrupted: continue from its last checkpoint
        try:
            episode = load_checkpoint(run_dir / "checkpoint.pt")["episode"]
            print(f"{name}: continuing from episode {episode} to {episodes}", flush=True)
            return config, run_dir, train(config, run_dir, resume=True, echo=echo)
        except DistqError as err:  # another config or a damaged file: start again
            print(f"{name}: cannot continue ({err}); training afresh", flush=True)
    print(f"{name}: training {episodes} episodes", flush=True)
    return config, run_dir, train(config, run_dir, overwrite=True, echo=echo)


def _ci(mean: float, half: float) -> str:
    return f"{mean:.3f} +- {half:.3f}"


def figure1(args) -> str:
    rows = ["| beta | right-mode mass (x > 0) | closed-form tilt | mean reward | KL to the data | KL floor |",
            "|---|---|---|---|---|---|"]
    for beta in (0.0, 0.1, 1.0):
        config, run_dir, summary = trained(f"gmm1d_beta{beta:g}", "configs/gmm1d.yaml", [f"train.beta={beta}"], args)
        samples = torch.tensor(pq.read_table(run_dir / "samples.parquet").column("x0").to_numpy())
        rows.append(f"| {beta:g} | {float((samples > 0).float().mean()):.3f} | {right_mode_mass(beta):.3f} | "
                    f"{_reward_kl(summary)} | {summary['kl_floor']:.3f} |")
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


def kl_at_reward(points: list[tuple[float, float]], target: float) -> Optional[float]:
    """KL at mean reward `target`, linearly interpolated between two consecutive runs of a beta sweep whose rewards
    bracket it; points: (reward, KL) by increasing beta. None when no consecutive pair brackets the target."""
    for (r0, kl0), (r1, kl1) in zip(points, points[1:]):
        if r0 != r1 and min(r0, r1) <= target <= max(r0, r1):
            return kl0 + (target - r0) / (r1 - r0) * (kl1 - kl0)
    return None


def _finetuned(model: str, model_dir: Path, method: str, beta: float, args) -> tuple[dict, dict]:
    """`method` fine-tuning `model_dir` at `beta` for args.finetune_episodes: its summary (evaluated on its training
    grid) and its evaluation with the sde at FINER_SAMPLING_STEPS."""
    overrides = [*EMBEDDING, f"train.init={model_dir}", f"train.algorithm={method}", f"train.beta={beta}"]
    if method != "qlearning":
        overrides.append("train.processes=1")
    config, run_dir, summary = trained(f"table_{model}_{method}_beta{beta:g}", FINE_CONFIG, overrides, args,
                                       args.finetune_episodes)
    return summary, finer_sampling(config, run_dir)


def finer_sampling(config: Config, run_dir: Path) -> dict:
    """The finished run's metrics with the sde at FINER_SAMPLING_STEPS on its own grid power."""
    return evaluate_on(trained_rollout(config, run_dir), config, "sde", config.sde.grid_power, FINER_SAMPLING_STEPS)


def _reward_kl(metrics: dict) -> str:
    return f"{_ci(metrics['reward_mean'], metrics['reward_ci95'])} | {_ci(metrics['kl_mean'], metrics['kl_ci95'])}"


def pretrained_model(name: str, share: float, args, embedded: bool = True) -> tuple[Config, Path, dict]:
    """Model A (share 1: args.episodes at beta = 0) or B (share 0.6: the paper's 30,000 of 50,000), with the learned
    time embedding (EMBEDDING) or, `embedded` False, with the paper's tau / T input."""
    return trained(f"model_{name}_time{TIME_FREQUENCIES}" if embedded else f"model_{name}", FINE_CONFIG,
                   ["train.beta=0", *(EMBEDDING if embedded else ())], args, round(share * args.episodes))


def tables3_4(args) -> str:
    """Models A (args.episodes at beta = 0) and B (60% of that: the paper's 30,000 of 50,000) fine-tuned by DDPO,
    DPOK, q-learning and weighted dsm; each method's KL at equal reward from its beta sweep."""
    sections = []
    for model, share, paper in (("A", 1.0, PAPER_TABLE3), ("B", 0.6, PAPER_TABLE4)):
        model_config, model_dir, pretrained = pretrained_model(model, share, args)
        rows = ["| method | " + " | ".join(f"KL at reward {r:g} (paper)" for r in TARGETS) + " |",
                "|---|" + "---|" * len(TARGETS),
                "| exponential tilt of the data (least possible) | " + " | ".join(f"{f:.2f}" for f in TILT_FLOOR)
                + " |"]
        finer = finer_sampling(model_config, model_dir)
        finer_columns = f"reward, {FINER_SAMPLING_STEPS} steps | KL, {FINER_SAMPLING_STEPS} steps"
        sweep = [f"| method | beta | reward | KL | {finer_columns} |",
                 "|---|---|---|---|---|---|",
                 f"| pretrained model {model} (paper: reward {paper['pretrained'][0]}, KL "
                 f"{paper['pretrained'][1]}) | 0 | {_reward_kl(pretrained)} | {_reward_kl(finer)} |"]
        for method, betas in FINETUNE_BETAS.items():
            name, quoted = METHOD_LABELS.get(method, method), paper.get(method, ("-",) * len(TARGETS))
            points: tuple[list, list] = ([], [])
            for beta in betas:
                evaluations = _finetuned(model, model_dir, method, beta, args)
                for sampled, metrics in zip(points, evaluations):
                    sampled.append((metrics["reward_mean"], metrics["kl_mean"]))
                sweep.append(f"| {name} | {beta:g} | " + " | ".join(map(_reward_kl, evaluations)) + " |")
            for label, sampled in zip((name, f"{name}, sampled at {FINER_SAMPLING_STEPS} steps"), points):
                cells = [kl_at_reward(sampled, r) for r in TARGETS]
                rows.append(f"| {label} | " + " | ".join(
                    f"{'not bracketed' if kl is None else f'{kl:.3f}'} ({p})" for kl, p in zip(cells, quoted))
                    + " |")
        if "ddpo_sf" in paper:  # DDPO normalises rewards per batch, so beta does not matter: one run
            evaluations = _finetuned(model, model_dir, "ddpo_sf", 1.0, args)
            sweep.append(f"| ddpo_sf (paper: reward {paper['ddpo_sf'][0]}, KL {paper['ddpo_sf'][1]}) | any | "
                         + " | ".join(map(_reward_kl, evaluations)) + " |")
        sections.append(f"## Table {3 if model == 'A' else 4}: model {model} "
                        f"(`{model_dir.relative_to(args.out.parent)}`, {round(share * args.episodes):,} episodes at "
                        "beta = 0)\n\n" + "\n".join(rows) +
                        "\n\nThe runs behind it (KL at a reward is interpolated linearly between the two runs of a "
                        "method whose rewards bracket it):\n\n" + "\n".join(sweep))
    return ("# Tables 3-4: fine-tuning pretrained models with DDPO, DPOK, q-learning and weighted dsm\n\n" +
            _header(args) +
            f"Every run: `{FINE_CONFIG}` with `model.time_frequencies: {TIME_FREQUENCIES}` (a learned time "
            "embedding); fine-tuning runs start from the model's policy (`train.init`) and take "
            f"{args.finetune_episodes:,} episodes. Each is evaluated with the sde on its training grid "
            f"({model_config.sde.num_steps} steps) and at {FINER_SAMPLING_STEPS} steps (rows `sampled at "
            f"{FINER_SAMPLING_STEPS} steps`: the same policy, a finer discretisation of the same continuous-time "
            "process). Weighted dsm (`train.algorithm: dsm` at beta > 0, no RL) regresses on the data drawn by "
            "the weights exp(beta h), also from the model's policy, on the data smoothed by `ratio.bandwidth` as "
            "the ratio estimator's.\n\n" + "\n\n".join(sections)
            + "\n")


def trained_rollout(config: Config, run_dir: Path):
    """The dataset, reward and a rollout carrying the policy of the finished run in run_dir, for evaluations."""
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    rollout = build_rollout(config, dataset.points, reward)
    rollout.set_weights(deployed_policy(load_checkpoint(run_dir / "checkpoint.pt")["learner"]))
    return dataset, reward, rollout


def tables5_6(args, models: dict) -> str:
    sections = []
    for beta, paper, title in ((0.0, PAPER_TABLE5, "Table 5: beta = 0"),
                               (2.25, PAPER_TABLE6, "Table 6: reward-directed (the paper's reward 0.8)")):
        config, run_dir, summary = models[beta]
        dataset, reward, rollout = trained_rollout(config, run_dir)
        rows = ["| sampler | " + " | ".join(f"{k} steps: KL (paper) / reward" for k in STEPS) + " |",
                "|---|" + "---|" * len(STEPS)]
        for sampler, numbers in paper.items():
            cells = []
            for steps, paper_kl in zip(STEPS, numbers):
                metrics = evaluate_policy(rollout, dataset, reward, config, make_grid(config, steps), sampler)[0]
                cells.append(f"{_ci(metrics['kl_mean'], metrics['kl_ci95'])} ({paper_kl}) / "
                             f"{metrics['reward_mean']:.3f}")
            rows.append(f"| {sampler} | " + " | ".join(cells) + " |")
        sections.append(f"## {title}\n\nModel: `{run_dir.relative_to(args.out.parent)}` (beta = {beta:g}, trained with "
                        f"{config.sde.sampler} at {config.sde.num_steps} steps; reward {summary['reward_mean']:.3f})."
                        "\n\n" + "\n".join(rows))
    return ("# Tables 5-6: samplers and step counts (the same trained policy, evaluated on other grids)\n\n" +
            _header(args) + "\n\n".join(sections) + "\n")


def on_grid(config: Config, sampler: str, power: float, steps: int) -> Config:
    """The config of an evaluation cell: `sampler` at `steps` steps on grid power `power` (heun and dpmpp_2m,
    generation-only samplers, stand on the ode_euler config and are passed to the evaluations by name)."""
    return dataclasses.replace(config, sde=dataclasses.replace(
        config.sde, sampler=sampler if sampler in SAMPLERS else "ode_euler", grid_power=power, dt=config.sde.T / steps))


def evaluate_on(trained: tuple, config: Config, sampler: str, power: float, steps: int) -> dict:
    """The metrics of a trained run's policy (trained_rollout's (dataset, reward, rollout) of `config`'s run) with
    `sampler` at `steps` steps on grid power `power`."""
    dataset, reward, rollout = trained
    cell = on_grid(config, sampler, power, steps)
    return evaluate_policy(rollout, dataset, reward, cell, make_grid(cell), sampler)[0]


def grid_ablation(args) -> str:
    """Table 5's question (beta = 0, few steps) for model A with the paper's tau / T input: each sampler (and the
    SECOND_ORDER ones) at 50 / 10 / 5 steps on grids t_k = T ((K - k) / K)^p, p = 1 (the paper's) / 1.5 / 2, beside a
    perfect learner on the same grid."""
    config, run_dir, _ = pretrained_model("A", 1.0, args, embedded=False)
    trained = trained_rollout(config, run_dir)
    rows = ["| sampler | grid power | " + " | ".join(f"{k} steps: KL learned / perfect learner" for k in STEPS) + " |",
            "|---|---|" + "---|" * len(STEPS)]
    for sampler in (*PAPER_TABLE5, *SECOND_ORDER):
        for power in GRID_POWERS:
            cells = []
            for steps in STEPS:
                learned = evaluate_on(trained, config, sampler, power, steps)
                perfect = evaluate_perfect_learner(on_grid(config, sampler, power, steps), *trained[:2],
                                                   sampler)["kl_mean"]
                cells.append(f"{_ci(learned['kl_mean'], learned['kl_ci95'])} / {perfect:.3f}")
            rows.append(f"| {sampler} | {power:g} | " + " | ".join(cells) + " |")
    return (f"## Ablation: time grids (model A: `{run_dir.relative_to(args.out.parent)}`, `{FINE_CONFIG}`, trained "
            f"with sde at {config.sde.num_steps} steps on grid power {config.sde.grid_power:g})\n\n"
            "Paper, Table 5 at 5 steps: ddim 0.72, ode_euler 0.56, sde 0.83 (uniform grid). The perfect learner is "
            "the reverse process driven by the exact ratio score (ratio.bandwidth included) on the same grid and "
            "sampler. "
            "heun: second-order probability-flow ODE, two policy evaluations per step; dpmpp_2m: DPM-Solver++(2M), "
            "ddim made second order with the previous step's denoised state, one evaluation per step (both "
            "generation only).\n\n"
            + "\n".join(rows) + "\n")


def time_embedding_ablation(args) -> str:
    """Table 5's few-step question for model A with and without the learned time embedding (model.time_frequencies =
    TIME_FREQUENCIES), with ddim and the SECOND_ORDER samplers on the grids of EMBEDDING_GRID_POWERS."""
    evaluated = []
    for embedded in (False, True):
        config, run_dir, _ = pretrained_model("A", 1.0, args, embedded)
        evaluated.append((config, run_dir, trained_rollout(config, run_dir)))
    rows = ["| sampler | grid power | " + " | ".join(f"{k} steps: KL tau / T / learned embedding" for k in STEPS)
            + " |", "|---|---|" + "---|" * len(STEPS)]
    for sampler in ("ddim", *SECOND_ORDER):
        for power in EMBEDDING_GRID_POWERS:
            cells = []
            for steps in STEPS:
                kls = []
                for config, _, trained in evaluated:
                    metrics = evaluate_on(trained, config, sampler, power, steps)
                    kls.append(_ci(metrics["kl_mean"], metrics["kl_ci95"]))
                cells.append(" / ".join(kls))
            rows.append(f"| {sampler} | {power:g} | " + " | ".join(cells) + " |")
    runs = " and ".join(f"`{run_dir.relative_to(args.out.parent)}`" for _, run_dir, _ in evaluated)
    return (f"## Ablation: a learned time embedding (models {runs}: `{FINE_CONFIG}` at beta = 0, the second with "
            f"`model.time_frequencies: {TIME_FREQUENCIES}`)\n\n"
            "The networks see tau / T (the paper) or also sin and cos of learned frequencies of it "
            "(distq.maths.policy.TimeEmbedding); each cell: KL without / with.\n\n"
            + "\n".join(rows) + "\n")


def _header(args) -> str:
    evaluation = f"eval {args.eval_batches} batches of 300"
    mode = (f"**QUICK: {args.episodes:,} episodes per run (the paper: 50,000), {evaluation}**"
            if args.episodes < 50_000 else f"{args.episodes:,} episodes per run, {evaluation}")
    return f"{mode}. Command: `{args.command}`. Hardware: {describe_machine()}.\n\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with each option's default filled in and the command recorded for the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3,000 episodes and 5 evaluation batches per run")
    parser.add_argument("--episodes", type=int, help="episodes per run (default 50,000; --quick 3,000)")
    parser.add_argument("--eval-batches", type=int, help="evaluation batches (default 20; --quick 5)")
    parser.add_argument("--finetune-episodes", type=int, help="episodes per fine-tuning run of Tables 3-4 "
                                                              "(default 10,000; --quick 300)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="output directory (default results/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the script's own (e.g. train.device=cuda); "
                             "repeatable")
    args = parser.parse_args(argv)
    args.command = "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.episodes = args.episodes or (3000 if args.quick else 50_000)
    args.eval_batches = args.eval_batches or (5 if args.quick else 20)
    args.finetune_episodes = args.finetune_episodes or (300 if args.quick else 10_000)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figure1.md").write_text(figure1(args))
    text, models = figure3(args)
    (args.out / "figure3.md").write_text(text)
    (args.out / "tables5_6.md").write_text(tables5_6(args, models))
    (args.out / "tables3_4.md").write_text(tables3_4(args))
    with (args.out / "tables5_6.md").open("a") as tables:
        tables.write("\n" + grid_ablation(args) + "\n" + time_embedding_ablation(args))
    print(f"wrote {args.out}/figure1.md, figure3.md, tables5_6.md, tables3_4.md and the plots")


if __name__ == "__main__":
    main()
