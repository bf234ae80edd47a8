"""Ray Tune glue for sweeps (distq.edges.sweep): each trial is one distq training run, in the trial's process.

A trial steps one distq.training.trainer.Trainer, checkpoints and evaluates it every `report_every` episodes and
reports the evaluation (reward_mean, kl_mean, their CIs, the objective) with the run directory as the Tune checkpoint. So ASHA stops trials on the real
objective, and a resumed sweep continues every unfinished trial from its last report.

Resources: a trial reserves `resources.cpu` / `resources.gpu` (at least 2 CPUs with train.processes = 2 where it
applies, whose critic process has a core of its own); with parallel.workers > 0 its placement group also holds one
bundle for the Learner actor and one per RolloutWorker, so trials never oversubscribe the cluster. A ddp trial
(parallel.mode = ddp) is the exception: Ray Train (V2, Ray's default) places its workers in a placement group of
their own, outside the trial's, so the trial reserves its own process only and the sweep runs at most as many trials
at once as the cluster holds with their workers (else trials would hold every CPU while their workers wait).

Over 300 lines: the Tune driver: placement of trials (and of ddp trials' workers), one run per trial with its
reports, resuming a stopped sweep, and the sweep's outputs (results.parquet, best.yaml, pareto.png).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pyarrow.fs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

import distq
from distq.backends.ray_cluster import connect_ray
from distq.edges.sweep import Dimension, Sweep, config_from_flat, load_sweep
from distq.errors import DistqError
from distq.runs import rundir
from distq.runs.interrupt import Interrupted, Signals
from distq.runs.interrupt import name as signal_name
from distq.runs.interrupt import raise_interrupted
from distq.runs.rundir import save_config
from distq.setup.config import ParallelConfig, single_process_reason

if TYPE_CHECKING:  # the driver imports no torch: its trials do
    from distq.runs.progress import Echo

RUN = "run"
"""A trial's distq run directory, inside its Tune trial directory (each checkpoint is a copy of it)."""
CONFIG_PREFIX = "config/"



def _domain(dim: Dimension) -> Any:
    if dim.kind == "grid":
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dim.kind](*dim.values)


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Tune's param_space: the searched dotted paths only (a trial's config is sweep.base updated by them)."""
    return {dim.path: _domain(dim) for dim in sweep.search_space}


def _report_points(start: int, episodes: int, every: int) -> list[int]:
    """Episodes at which a trial continuing from `start` reports: multiples of `every`, then the last one."""
    return [*range((start // every + 1) * every, episodes, every), episodes]


def _restore(run_dir: Path) -> int:
    """Put the trial's last Tune checkpoint (a run directory) in place; the episode it reached (0: fresh)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    shutil.rmtree(run_dir, ignore_errors=True)
    checkpoint.to_directory(str(run_dir))
    return int(json.loads((run_dir / rundir.SUMMARY).read_text())["episodes"])


def _metrics(summary: dict[str, Any], run_dir: Path, sweep: Sweep) -> dict[str, float]:
    """The evaluation's numbers, the last training window's TD loss and reward, the episode and the objective."""
    numbers = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    episode = int(numbers.pop("episodes"))
    last = rundir.read_table_rows(run_dir / rundir.METRICS)[-1]
    window = {k: float(last[k]) for k in ("loss/td", "reward/terminal_mean") if last.get(k) is not None}
    return {**numbers, **window, "episode": episode, "objective": sweep.objective(numbers)}


def run_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """Tune function trainable: train the trial's config, reporting and checkpointing every report_every episodes.
    One Trainer (its data, networks and actors) serves all the reports; a ddp run, whose loop runs in its Ray Train
    workers, is continued from its checkpoint for each report instead."""
    from distq.training.trainer import Trainer

    full = config_from_flat({**sweep.base, **config})
    full = dataclasses.replace(full, tracking=dataclasses.replace(full.tracking, wandb=False))  # the callback logs
    run_dir = Path(tune.get_context().get_trial_dir()) / RUN
    start = _restore(run_dir)

    def report(summary: dict[str, Any]) -> None:
        tune.report(_metrics(summary, run_dir, sweep), checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

    if full.parallel.mode != "ddp":
        with Trainer(full, run_dir, resume=start > 0, overwrite=start == 0, echo=lambda line: None,
                     report_every=sweep.report_every) as trainer:
            while not trainer.done:
                trainer.step()
                if trainer.episode % sweep.report_every == 0 and not trainer.done:
                    trainer.save()
                    summary = trainer.evaluate()
                    rundir.write_json(run_dir / rundir.SUMMARY, summary)
                    report(summary)
            summary = trainer.finish()
        report(summary)  # the run directory unlocked, as a resumed trial finds it
        return
    for end in _report_points(start, full.train.episodes, sweep.report_every):
        segment = dataclasses.replace(full, train=dataclasses.replace(full.train, episodes=end))
        with Trainer(segment, run_dir, resume=start > 0, overwrite=start == 0, echo=lambda line: None) as trainer:
            summary = trainer.run()
        report(summary)
        start = end


def _bundle(cpu: float, gpu: float, memory_mb: Optional[float] = None) -> dict[str, float]:
    """A placement-group bundle; memory in bytes, as Ray counts it (the actor's reservation must fit its bundle)."""
    return {k: float(v) for k, v in (("CPU", cpu), ("GPU", gpu), ("memory", (memory_mb or 0) * 2**20)) if v > 0}


def _processes(config: dict[str, Any]) -> int:
    """The processes a trial's run uses: train.processes = 2 is taken as 1 where it cannot split the run."""
    try:
        full = config_from_flat(config)
    except DistqError:  # the trial itself stops with the error; reserve what it asked for
        return int(config["train.processes"])
    return 1 if single_process_reason(full) else full.train.processes


def trial_resources(sweep: Sweep) -> Callable[[dict[str, Any]], tune.PlacementGroupFactory]:
    """Placement group of a trial: its own process, then (parallel.workers > 0) the Learner and each RolloutWorker."""
    def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        config = {**sweep.base, **config}
        bundles = [_bundle(max(sweep.resources.cpu, _processes(config)), sweep.resources.gpu)]
        workers = int(config["parallel.workers"])
        if workers and config["parallel.mode"] != "ddp":
            bundles.append(_bundle(config["parallel.learner_num_cpus"], config["parallel.learner_num_gpus"],
                                   config["parallel.learner_memory_mb"]))
            worker = _bundle(config["parallel.num_cpus_per_worker"], config["parallel.num_gpus_per_worker"],
                             config["parallel.memory_per_worker_mb"])
            bundles += [worker] * workers
        return tune.PlacementGroupFactory([b for b in bundles if b], strategy="PACK")

    return resources


def _largest(sweep: Sweep, path: str) -> Any:
    """The largest value a trial can give `path` (its searched values, else the base's)."""
    for dim in sweep.search_space:
        if dim.path == path:
            return max(dim.values) - (1 if dim.kind == "randint" else 0)  # randint's high is excluded
    return sweep.base[path]


def concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> Optional[int]:
    """How many trials may run at once: None (as many as their placement groups allow) unless trials train in ddp,
    whose workers Ray Train places outside the trial's placement group; then as many as fit with their workers
    in `cluster` (Ray's resources), at least 1."""
    modes = next((dim.values for dim in sweep.search_space if dim.path == "parallel.mode"), (sweep.base["parallel.mode"],))
    if "ddp" not in modes:
        return None
    workers = int(_largest(sweep, "parallel.workers"))
    need = {"CPU": max(sweep.resources.cpu, 1.0) + workers * float(_largest(sweep, "parallel.num_cpus_per_worker")),
            "GPU": sweep.resources.gpu + workers * float(_largest(sweep, "parallel.num_gpus_per_worker"))}
    fits = [math.floor(cluster.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items() if amount > 0]
    return max(1, min(fits))


def trainable(sweep: Sweep):
    """The trial function with the sweep bound and its resources declared (the same object for fit and restore)."""
    return tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), trial_resources(sweep))


def _search_alg(sweep: Sweep):
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search.seed)
    return BasicVariantGenerator(random_state=sweep.search.seed)


def _scheduler(sweep: Sweep):
    if sweep.scheduler.name == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="episode", max_t=sweep.episodes, reduction_factor=sweep.scheduler.reduction_factor,
                         grace_period=sweep.scheduler.grace_period or sweep.report_every)


def _callbacks(sweep: Sweep) -> list:
    if not sweep.tracking.wandb:
        return []
    from distq.edges.wandb_callback import trial_wandb_callback

    return [trial_wandb_callback(sweep.tracking, sweep.tracking.group or sweep.name, sweep.base)]


def new_tuner(sweep: Sweep, storage: str) -> tune.Tuner:
    """A Tuner for the sweep; the objective is reported as `objective` (see Sweep.objective)."""
    return tune.Tuner(
        trainable(sweep), param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric="objective", mode=sweep.search.mode, search_alg=_search_alg(sweep),
                                    scheduler=_scheduler(sweep), num_samples=sweep.search.num_samples,
                                    reuse_actors=True,
                                    max_concurrent_trials=concurrent_trials(sweep, ray.cluster_resources())),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage, callbacks=_callbacks(sweep),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def default_sweep() -> Path:
    """tuning/smoke.yaml of the working directory, else of the distq checkout (as on a cluster's head node)."""
    for root in (Path.cwd(), Path(distq.__file__).resolve().parent.parent):
        if (root / "tuning" / "smoke.yaml").is_file():
            return root / "tuning" / "smoke.yaml"
    raise DistqError("no sweep file given and tuning/smoke.yaml not found here or beside the distq package")


def _rows(grid, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: its final reported metrics (scalars) and its whole config under `config/<dotted path>`."""
    rows = []
    for result in grid:
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        rows.append({**metrics, "status": "error" if result.error else "ok", "trial_dir": str(result.path),
                     "checkpoint": result.checkpoint.path if result.checkpoint else None,
                     **{CONFIG_PREFIX + k: v for k, v in {**sweep.base, **result.config}.items()}})
    return rows


def run_sweep(path: str | Path, address: Optional[str] = None, resume: bool = False,
              num_samples: Optional[int] = None, storage: Optional[str] = None, echo: Echo = print) -> dict[str, Any]:
    """Run (or with `resume`, continue) a sweep; writes results.parquet, best.yaml and pareto.png beside Tune's
    experiment state in STORAGE/NAME and returns {'experiment': dir, 'best': row or None, ...paths}."""
    if resume and num_samples is not None:
        raise DistqError("--num-samples cannot change a sweep on --resume (Tune continues the saved search)")
    sweep = load_sweep(path, num_samples=num_samples, storage=storage)
    remote = "://" in sweep.storage
    root = sweep.storage.rstrip("/") if remote else str(Path(sweep.storage).expanduser().resolve())
    experiment = f"{root}/{sweep.name}"
    exists = tune.Tuner.can_restore(experiment)
    if resume and not exists:
        raise DistqError(f"cannot resume: {experiment} holds no Tune experiment state")
    if not resume and exists:
        raise DistqError(f"{experiment} already holds sweep '{sweep.name}'; pass --resume to continue it, "
                         "or change `name` / --storage")
    # Checkpoints are kept two per trial; Tune warns each time that forces a state snapshot, which is what we want.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # _SweepStop hands SIGINT and SIGTERM alike to Tune's stop
    # Tune's own lines (trial table, errors) are what a sweep's user reads: not quiet
    timeout = float(sweep.base.get("parallel.connect_timeout_s", ParallelConfig.connect_timeout_s))
    started = connect_ray(address, timeout, quiet=False)
    try:
        with _SweepStop() as stop:  # after ray.init, which installs a SIGTERM handler of its own
            try:
                if resume:
                    tuner = tune.Tuner.restore(experiment, trainable=trainable(sweep), resume_unfinished=True)
                else:
                    tuner = new_tuner(sweep, root)
                grid = tuner.fit()
            except (Interrupted, KeyboardInterrupt) as err:
                stop.signum = getattr(err, "signum", signal.SIGINT)
            if stop.signum is not None:
                again = f"distq tune {path} --resume" + (f" --storage {storage}" if storage else "")
                raise Interrupted(stop.signum, _stopped_message(stop.signum, again, experiment))
    finally:
        if started:
            ray.shutdown()
    rows = _rows(grid, sweep)
    outputs = _upload_results(experiment, sweep, rows) if remote else write_results(Path(experiment), sweep, rows)
    _announce(outputs, sweep, echo)
    return outputs


class _SweepStop(Signals):
    """SIGINT or SIGTERM while Tune runs: Tune's own graceful stop (its SIGUSR1 handler, which saves the experiment
    state one last time), then Interrupted; before or after Tune's loop, Interrupted at once."""

    def __init__(self):
        super().__init__(self._stop)
        self.signum: Optional[int] = None

    def _stop(self, signum: int) -> None:
        self.signum = signum
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_stop):
            raise_interrupted(signum)
        tune_stop(signum, None)


def _stopped_message(signum: int, again: str, experiment: str) -> str:
    if tune.Tuner.can_restore(experiment):
        return f"sweep stopped by {signal_name(signum)}; its state is saved in {experiment} (continue with: {again})"
    return f"sweep stopped by {signal_name(signum)} before Tune saved any state; start it again"


def _announce(outputs: dict[str, Any], sweep: Sweep, echo: Echo) -> None:
    best = outputs["best"]
    if best is None:
        echo(f"no trial of sweep '{sweep.name}' finished; see {outputs['experiment']}")
    else:
        echo(f"best trial {best['trial_id']}: reward {best['reward_mean']:.4f} ± {best['reward_ci95']:.4f} | "
             f"KL {best['kl_mean']:.4f} ± {best['kl_ci95']:.4f} | objective {best['objective']:.4g}")
    for key in ("results", "best_config", "pareto"):
        if outputs.get(key):
            echo(f"{key.replace('_', ' ')}: {outputs[key]}")
    if sweep.tracking.wandb:
        echo(f"W&B runs: {outputs['experiment']}/*/wandb (upload offline ones with "
             f"`wandb sync {outputs['experiment']}/*/wandb/offline-run-*`)")


def best_row(rows: list[dict[str, Any]], sweep: Sweep) -> Optional[dict[str, Any]]:
    """The best finished trial: with a reward target, the least KL among trials reaching it; with a KL budget, the
    most reward among trials within it; else (or if none is feasible) the best objective."""
    done = [r for r in rows if r["status"] == "ok" and math.isfinite(r.get("objective", math.nan))]
    target, budget = sweep.search.reward_target, sweep.search.kl_budget
    feasible = [r for r in done if target is not None and r["reward_mean"] >= target]
    if feasible:
        return min(feasible, key=lambda r: r["kl_mean"])
    within = [r for r in done if budget is not None and r["kl_mean"] <= budget]
    if within:
        return max(within, key=lambda r: r["reward_mean"])
    if not done:
        return None
    return (min if sweep.search.mode == "min" else max)(done, key=lambda r: r["objective"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (kl, reward) points no other point beats on both (lower KL, higher reward), by KL."""
    front = [i for i, (kl, reward) in enumerate(points)
             if not any(k <= kl and r >= reward and (k, r) != (kl, reward) for k, r in points)]
    return sorted(front, key=lambda i: points[i][0])


PER_REWARD = "reward_mean/"
"""Each reward's mean in the rows of trials with a list reward.fn (distq.training.evaluation.per_reward)."""


def pareto_figure(rows: list[dict[str, Any]], best: Optional[dict[str, Any]], target: Optional[float],
                  budget: Optional[float] = None):
    """Mean reward against kNN KL of every finished trial (95% CIs), the Pareto front and the best trial; with a list
    reward.fn also, per pair of rewards, one reward's mean against the other's (a weights sweep's trade-off)."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "ok" and "kl_mean" in r]
    names = list(dict.fromkeys(k[len(PER_REWARD):] for r in done for k, v in r.items()
                               if k.startswith(PER_REWARD) and v is not None))
    pairs = list(itertools.combinations(names, 2))
    fig = Figure(figsize=(6 * (1 + len(pairs)), 4.5))
    ax = fig.add_subplot(1, 1 + len(pairs), 1)
    _front(ax, done, "kl_mean", "reward_mean", best, lower_x=True)
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"reward target {target:g}")
    if budget is not None:
        ax.axvline(budget, linestyle="--", color="grey", label=f"KL budget {budget:g}")
    ax.set_xlabel("KL(generated || data), kNN estimate")
    ax.set_ylabel("mean reward" + (" (each trial's weighted sum)" if names else ""))
    ax.legend()
    for index, (first, second) in enumerate(pairs):
        ax = fig.add_subplot(1, 1 + len(pairs), index + 2)
        # trials of a sweep that also searches reward.fn may lack one of the two
        both = [r for r in done if r.get(PER_REWARD + first) is not None and r.get(PER_REWARD + second) is not None]
        points = _front(ax, both, PER_REWARD + first, PER_REWARD + second, best if best in both else None,
                        lower_x=False)
        fig.colorbar(points, ax=ax, label="kNN KL")
        ax.set_xlabel(PER_REWARD + first)
        ax.set_ylabel(PER_REWARD + second)
        ax.legend()
    fig.tight_layout()
    return fig


def _front(ax, done: list[dict[str, Any]], x: str, y: str, best: Optional[dict[str, Any]], lower_x: bool):
    """The trials' (x, y) means with their 95% CIs, coloured by KL, their Pareto front (more y, and less x if
    `lower_x`, else more x) and the best trial; -> the scatter (for a colour bar)."""
    ax.errorbar([r[x] for r in done], [r[y] for r in done], xerr=[r[x.replace("_mean", "_ci95", 1)] for r in done],
                yerr=[r[y.replace("_mean", "_ci95", 1)] for r in done], fmt="none", color="0.6", alpha=0.6)
    points = ax.scatter([r[x] for r in done], [r[y] for r in done], c=[r["kl_mean"] for r in done], cmap="viridis",
                        zorder=2, label="trials")
    sign = 1 if lower_x else -1
    front = [done[i] for i in pareto_front([(sign * r[x], r[y]) for r in done])]
    ax.plot([r[x] for r in front], [r[y] for r in front], "-", color="tab:orange", label="Pareto front")
    if best is not None:
        ax.plot(best[x], best[y], "*", markersize=16, color="tab:red", label="best")
    return points


def plot_pareto(rows: list[dict[str, Any]], best: Optional[dict[str, Any]], target: Optional[float],
                path: Path, budget: Optional[float] = None) -> None:
    """pareto_figure as PNG at `path`, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = pareto_figure(rows, best, target, budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        FigureCanvasAgg(fig).print_png(handle)
    os.replace(tmp, path)


def write_results(experiment: Path, sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results.parquet (all trials), best.yaml (the best trial's training config) and pareto.png."""
    experiment.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Any] = {"experiment": experiment, "results": experiment / "results.parquet", "trials": len(rows)}
    columns = list(dict.fromkeys(k for row in rows for k in row))
    rundir.write_table(outputs["results"], [{k: row.get(k) for k in columns} for row in rows])
    best = outputs["best"] = best_row(rows, sweep)
    if best is not None:
        config = config_from_flat({k[len(CONFIG_PREFIX):]: v for k, v in best.items() if k.startswith(CONFIG_PREFIX)})
        outputs["best_config"] = experiment / "best.yaml"
        save_config(config, outputs["best_config"])
        outputs["pareto"] = experiment / "pareto.png"
        plot_pareto(rows, best, sweep.search.reward_target, outputs["pareto"], sweep.search.kl_budget)
    return outputs


def _upload_results(experiment: str, sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """write_results for an experiment at a URI (s3://, gs://, ...): written here, then copied beside it."""
    with tempfile.TemporaryDirectory() as local:
        outputs = write_results(Path(local), sweep, rows)
        for key in ("results", "best_config", "pareto"):
            if key in outputs:
                target = f"{experiment}/{outputs[key].name}"
                pyarrow.fs.copy_files(str(outputs[key]), target)
                outputs[key] = target
    outputs["experiment"] = experiment
    return outputs
