"""Command line: `distq train | pretrain | sample | evaluate | tune | calibrate`. Argument parsing only; the work is in
distq.training.trainer and friends."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from distq.errors import DistqError
from distq.runs import rundir
from distq.runs.interrupt import Interrupted, Signals, raise_interrupted
from distq.setup.config import DEVICES, GENERATION_SAMPLERS, Config, config_from_dict
from distq.setup.configfile import load_config

# Each command imports what it needs (torch, the data, Ray) when it runs: `distq --help` and the Tune driver of
# `distq tune` start without them.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distq", description="Reward-directed diffusion by continuous-time q-learning")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(sub.add_parser("train", help="train a run, then evaluate it"))
    pretrain = sub.add_parser("pretrain", help="train a model without reward (train.beta = 0) to start other runs "
                                               "from (--init)")
    _add_train_arguments(pretrain)
    pretrain.add_argument("--method", choices=("qlearning", "dsm"),
                          help="qlearning: Algorithm 1 at beta = 0 (the paper's models A and B); dsm: denoising score "
                               "matching (default: qlearning; with --resume: the run's)")
    sample = sub.add_parser("sample", help="generate samples from a trained run",
                            description="Generate samples from a trained run. Reads only the run's checkpoint "
                                        "(checked against its checksum); runs no code from the run directory.")
    sample.add_argument("run_dir")
    sample.add_argument("-n", type=int, required=True, help="number of samples")
    sample.add_argument("--out", required=True, help="Parquet file to write")
    sample.add_argument("--sampler", choices=GENERATION_SAMPLERS, help="sampler (default: the run's; heun: second-order "
                                                                       "probability-flow ODE, two evaluations per step; "
                                                                       "dpmpp_2m: DPM-Solver++(2M), second-order ddim, "
                                                                       "one evaluation per step)")
    sample.add_argument("--steps", type=int, help="number of steps over [0, T] (default: the run's)")
    sample.add_argument("--grid-power", type=float, help="grid t_k = T ((K - k) / K)^P (default: the run's "
                                                         "sde.grid_power)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--condition", help="generate for this condition value only (conditional runs; default: "
                                            "conditions in the training data's shares)")
    evaluate = sub.add_parser("evaluate", help="evaluate a trained run or a file of its samples",
                              description="Evaluate a trained run or a file of its samples, writing "
                                          "RUN_DIR/evaluation.json. Security: this imports and runs the reward file "
                                          "named in the run's config (reward.fn): evaluate only run "
                                          "directories you trust.")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--samples", help="Parquet file of samples to evaluate instead of generating (conditional "
                                            "runs: with the condition column, as distq sample writes it)")
    evaluate.add_argument("--batches", type=int, help="batches of eval.n_samples (default: the run's eval.batches; "
                                                      "the paper uses 100; with --samples, as many as the file holds)")
    for command in (sample, evaluate):
        command.add_argument("--device", choices=DEVICES, help="where to generate (default: the run's "
                                                               "parallel.rollout_device)")
    _add_tune(sub)
    _add_calibrate(sub)
    return parser


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("config", nargs="?", help="YAML config (default with --resume: RUN_DIR/config.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
    train.add_argument("--out", help="run directory to create")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the outputs of a run already in --out")
    train.add_argument("--init", metavar="RUN_DIR", help="start from the policy of a trained run (train.init)")
    train.add_argument("--address", help="Ray cluster to join with parallel.workers > 0 ('auto' or host:port; "
                                         "default: RAY_ADDRESS, else an embedded local instance)")


def _add_tune(sub) -> None:
    tune = sub.add_parser("tune", help="run a Ray Tune sweep of training runs (see tuning/*.yaml)")
    tune.add_argument("sweep", nargs="?", help="sweep YAML (default: tuning/smoke.yaml)")
    tune.add_argument("--address", help="Ray cluster to join ('auto' or host:port; default: RAY_ADDRESS, else an "
                                        "embedded local instance)")
    tune.add_argument("--resume", action="store_true", help="continue the sweep from its experiment state and the "
                                                            "trials' checkpoints")
    tune.add_argument("--num-samples", type=int, help="override search.num_samples")
    tune.add_argument("--storage", help="experiment root directory or URI (default: the sweep's `storage`, "
                                        "runs/tune)")


def _add_calibrate(sub) -> None:
    calibrate = sub.add_parser("calibrate", help="find the beta whose trained model reaches a target mean reward, or "
                                                 "the one with the most reward within a KL budget")
    calibrate.add_argument("config", help="YAML training config")
    target = calibrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-reward", type=float, help="mean reward to reach")
    target.add_argument("--target-kl", type=float, help="KL budget: the most reward whose kl_mean stays within it "
                                                        "(reached when kl_mean is in [K - tolerance, K])")
    calibrate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                           help="override a config value (repeatable)")
    calibrate.add_argument("--out", help="directory for the probes' runs, calibrated.yaml and calibration.parquet/.md "
                                         "(default: runs/calibrate-CONFIG_NAME)")
    calibrate.add_argument("--tolerance", type=float, default=0.05, help="accepted |reward - target|, or KL below the budget "
                                                                         "(default 0.05)")
    calibrate.add_argument("--max-probes", type=int, default=8, help="trainings at most (default 8)")
    calibrate.add_argument("--beta-start", type=float, help="first beta to try (default: the config's beta if > 0, "
                                                            "else 1)")
    calibrate.add_argument("--overwrite", action="store_true", help="replace a calibration already in --out")


def _train(args: argparse.Namespace) -> None:
    from distq.training.trainer import train

    if args.init:
        args.overrides.append(f"train.init={args.init}")
    if args.command == "pretrain":
        args.overrides.append("train.beta=0")
        if args.method or not args.resume:
            args.overrides.append(f"train.algorithm={args.method or 'qlearning'}")
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise DistqError(f"--out {args.out} and --resume {args.resume} name different run directories")
        config_path = args.config or str(Path(args.resume) / rundir.CONFIG)
        train(load_config(config_path, args.overrides), args.resume, resume=True, address=args.address)
    elif not args.out:
        raise DistqError("distq train needs --out RUN_DIR (or --resume RUN_DIR)")
    elif not args.config:
        raise DistqError("distq train needs a CONFIG.yaml")
    else:
        train(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite, address=args.address)


def _load_run(run_dir: str) -> tuple[Config, dict]:
    from distq.runs.checkpoint import load_checkpoint

    payload = load_checkpoint(Path(run_dir) / rundir.CHECKPOINT)
    try:
        config = config_from_dict(payload["config"])
    except DistqError as err:
        raise DistqError(f"checkpoint in {run_dir} holds an invalid config: {err}") from None
    return config, payload


def _device(args: argparse.Namespace, config: Config):
    """--device, else the run's rollout device (a run trained on a GPU names cuda: --device cpu on a laptop)."""
    from distq.setup.devices import resolve_device

    if args.device:
        return resolve_device(args.device, "--device")
    return resolve_device(config.parallel.rollout_device, "the run's parallel.rollout_device (choose another with "
                                                          "--device)")


def _sample(args: argparse.Namespace) -> None:
    import torch

    from distq.algorithms.learner import deployed_policy
    from distq.backends.build import build_rollout, make_grid
    from distq.problems.standardize import stored

    if args.n < 1:
        raise DistqError(f"-n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise DistqError(f"--steps must be >= 1, got {args.steps}")
    if args.grid_power is not None and not (0 < args.grid_power < float("inf")):
        raise DistqError(f"--grid-power must be a positive number, got {args.grid_power}")
    out = Path(args.out)
    if out.is_dir():
        raise DistqError(f"--out {out} is a directory; name a .parquet file")
    rundir.check_writable_dir(out.parent, "--out")
    config, payload = _load_run(args.run_dir)
    columns, known = payload["columns"], payload.get("conditions")
    if args.condition is not None and known is None:
        raise DistqError(f"--condition: the run in {args.run_dir} is not conditional (no data.condition)")
    generator = torch.Generator().manual_seed(args.seed)
    conditions, condition_column = None, None
    if known is not None:
        values = [str(v) for v in known["values"]]
        if args.condition is not None and args.condition not in values:
            raise DistqError(f"--condition {args.condition!r} is not one of the run's conditions: {', '.join(values)}")
        conditions = (torch.full((args.n,), values.index(args.condition)) if args.condition is not None else
                      torch.multinomial(torch.tensor(known["probabilities"]), args.n, True, generator=generator))
        condition_column = (config.data.condition, [known["values"][int(c)] for c in conditions])
    # Generation needs only the policy: a placeholder stands in for the data and the reward.
    rollout = build_rollout(config, torch.zeros(2, len(columns)), terminal_reward=None,
                            classes=len(known["values"]) if known else 0, device=_device(args, config))
    rollout.set_weights(deployed_policy(payload["learner"]))
    if args.grid_power is not None:
        config = dataclasses.replace(config, sde=dataclasses.replace(config.sde, grid_power=args.grid_power))
    samples = rollout.generate(args.n, generator, make_grid(config, args.steps), args.sampler, conditions)
    samples = stored(payload).to_user(samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_samples(out, samples, columns, condition_column)
    print(f"wrote {args.n} samples ({args.sampler or config.sde.sampler}, "
          f"{args.steps or config.sde.num_steps} steps, grid power {config.sde.grid_power:g}) to {out}")


def _evaluate(args: argparse.Namespace) -> None:
    from distq.algorithms.learner import deployed_policy
    from distq.backends.build import build_rollout
    from distq.problems.data import load_dataset
    from distq.problems.rewards import load_reward
    from distq.problems.standardize import stored
    from distq.training.evaluation import evaluate_given, evaluate_policy, kl_reliability

    config, payload = _load_run(args.run_dir)
    if args.batches is not None:
        if args.batches < 2:
            raise DistqError(f"--batches must be >= 2 (a confidence interval needs two batches), got {args.batches}")
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batches=args.batches))
    dataset = load_dataset(config.data, config.seed, stored(payload))
    reward = load_reward(config.reward, dataset.points, dataset.labels, dataset.condition_values,
                         dataset.standardization)
    if args.samples:
        path = Path(args.samples)
        conditions = (rundir.read_conditions(path, config.data.condition, dataset.condition_values)
                      if dataset.classes else None)
        samples = dataset.standardization.to_model(rundir.read_samples(path, payload["columns"]))
        metrics = evaluate_given(samples, dataset, reward, config, conditions)
        metrics["samples"] = str(args.samples)
    else:
        rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels, device=_device(args, config))
        rollout.set_weights(deployed_policy(payload["learner"]))
        metrics = evaluate_policy(rollout, dataset, reward, config)[0]
    metrics.update(kl_reliability(config, dataset.dim))
    with rundir.locked(Path(args.run_dir), "run directory"):
        rundir.write_json(Path(args.run_dir) / "evaluation.json", metrics)
    print(json.dumps(metrics, indent=2))


def _tune(args: argparse.Namespace) -> None:
    from distq.edges.tuning import default_sweep, run_sweep

    run_sweep(args.sweep or default_sweep(), address=args.address, resume=args.resume, num_samples=args.num_samples,
              storage=args.storage)


def _calibrate(args: argparse.Namespace) -> None:
    from distq.edges.calibrate import calibrate

    out = args.out or str(Path("runs") / f"calibrate-{Path(args.config).stem}")
    kl = args.target_kl is not None
    calibrate(load_config(args.config, args.overrides), args.target_kl if kl else args.target_reward, out,
              tolerance=args.tolerance, max_probes=args.max_probes, beta_start=args.beta_start,
              overwrite=args.overwrite, metric="kl_mean" if kl else "reward_mean")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 a bad input or a failure (DistqError), 128 + the signal's number after SIGINT (130) or
    SIGTERM (143); each failure is one line on stderr."""
    args = _parser().parse_args(argv)
    try:
        with Signals(raise_interrupted):  # SIGTERM too ends in one line, not a silent death
            {"train": _train, "pretrain": _train, "sample": _sample, "evaluate": _evaluate, "tune": _tune,
             "calibrate": _calibrate}[args.command](args)
    except DistqError as err:
        print(f"distq: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"distq: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # raised where distq's handler was not installed
        print("distq: interrupted by SIGINT", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
