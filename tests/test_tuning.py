"""distq.edges.sweep and distq.edges.tuning: sweep files checked before any trial, a smoke sweep end to end (results,
best config, Pareto plot, offline W&B runs), and a sweep whose driver is killed, then resumed."""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import kill_processes_with
from ray.tune.schedulers import ASHAScheduler

from distq.edges.cli import main
from distq.edges.sweep import PENALTY, load_sweep
from distq.edges.tuning import (_report_points, _scheduler, _search_alg, best_row, concurrent_trials, param_space,
                                pareto_figure, pareto_front, run_sweep, trial_resources)
from distq.errors import DistqError
from distq.runs import rundir
from distq.setup.configfile import load_config

pytestmark = pytest.mark.plots  # its runs draw their PNGs (conftest: elsewhere they skip them)

ROOT = Path(__file__).resolve().parent.parent
TINY = {"data.n_samples": 64, "train.batch_size": 32, "train.chunk_size": 32, "sde.dt": 0.5,
        "train.episodes": 40, "eval.n_samples": 50, "eval.batches": 2, "train.processes": 1}


def _sweep_file(tmp_path: Path, name: str = "tiny", **fields) -> Path:
    values = {"name": name, "base": str(ROOT / "configs" / "swiss_roll.yaml"), "overrides": dict(TINY),
              "search_space": {"train.beta": {"grid": [0.0, 1.0]}}, "search": {"algorithm": "grid"},
              "report_every": 20, "tracking": {"wandb": False}, "storage": str(tmp_path / "runs")}
    values.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# ---- sweep files ---------------------------------------------------------------------------------------------

def test_shipped_sweeps_validate():
    for path in sorted((ROOT / "tuning").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.search_space and sweep.name == path.stem
    smoke = load_sweep(ROOT / "tuning" / "smoke.yaml")
    assert smoke.scheduler.name == "asha" and smoke.tracking.wandb
    paper = load_sweep(ROOT / "tuning" / "swiss_roll.yaml")
    assert {d.path for d in paper.search_space} == {"train.beta", "train.temperature", "train.lr_policy",
                                                    "train.lr_value"}
    assert paper.search.algorithm == "optuna" and paper.search.reward_target == 0.8


def test_base_is_relative_to_the_sweep_file_and_overrides_apply(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "b.yaml").write_text("train: {beta: 3.0}\n")
    path = _sweep_file(tmp_path, base="configs/b.yaml")
    sweep = load_sweep(path)
    assert sweep.base["train.beta"] == 3.0 and sweep.base["train.episodes"] == 40 and sweep.base["sde.dt"] == 0.5
    assert set(param_space(sweep)) == {"train.beta"}


BAD = [
    ({"search_space": {"train.betta": {"grid": [0, 1]}}}, ["search_space.train.betta", "did you mean 'train.beta'"]),
    ({"search_space": {"train": {"grid": [0, 1]}}}, ["search_space.train", "names a section"]),
    ({"search_space": {"train.lr_policy": {"uniform": [1.0e-3, 1.0e-3]}}}, ["search_space.train.lr_policy", "empty"]),
    ({"search_space": {"train.beta": {"grid": []}}}, ["search_space.train.beta", "non-empty"]),
    ({"search_space": {"train.beta": {"normal": [0, 1]}}}, ["search_space.train.beta", "'normal'"]),
    ({"search_space": {"train.beta": {"grid": [0, -1]}}}, ["search_space.train.beta", "train.beta", "-1"]),
    ({"search_space": {"train.lr_policy": {"loguniform": [0, 1]}}}, ["search_space.train.lr_policy", "low > 0"]),
    ({"search_space": {"train.batch_size": {"uniform": [8, 64]}}}, ["search_space.train.batch_size", "int"]),
    ({"serch": {"algorithm": "grid"}}, ["'serch'", "did you mean 'search'"]),
    ({"search": {"algorithm": "bayes"}}, ["search.algorithm", "optuna"]),
    ({"search": {"algorithm": "grid", "metrc": "kl_mean"}}, ["search.metrc", "did you mean 'search.metric'"]),
    ({"search": {"algorithm": "optuna"}}, ["search_space.train.beta", "grid", "optuna"]),
    ({"search": {"metric": "reward_mean", "reward_target": 0.8}}, ["search.reward_target", "kl_mean"]),
    ({"search": {"metric": "kl_mean", "kl_budget": 0.3}}, ["search.kl_budget", "reward_mean"]),
    ({"search": {"metric": "reward_mean", "kl_budget": -1}}, ["search.kl_budget", "positive"]),
    ({"overrides": {"train.epsiodes": 10}}, ["overrides.train.epsiodes", "did you mean 'train.episodes'"]),
    ({"overrides": {"train.episodes": 0}}, ["overrides", "train.episodes"]),
    ({"scheduler": {"name": "asha", "grace_period": 400}}, ["scheduler.grace_period", "train.episodes = 40"]),
    ({"report_every": 0}, ["report_every", ">= 1"]),
    ({"overrides": {**TINY, "train.lr_schedule": "cosine"}}, ["report_every", "cosine"]),
    ({"tracking": {"wandb": "yes"}}, ["tracking.wandb", "true or false"]),
]


@pytest.mark.parametrize("fields, expected", BAD, ids=[e[0] for _, e in BAD])
def test_bad_sweep_fails_before_any_trial_naming_the_field(tmp_path, fields, expected):
    path = _sweep_file(tmp_path, **fields)
    with pytest.raises(DistqError) as info:
        run_sweep(path)  # would start Ray and write the experiment if the file got through
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = _sweep_file(tmp_path, search_space={"train.betta": {"grid": [0, 1]}})
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search_space.train.betta" in err
    assert not (tmp_path / "runs").exists()


# ---- objective, Pareto front, report points --------------------------------------------------------------------

def test_trial_reserves_a_core_for_the_critic_process(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path))
    one = trial_resources(sweep)({"train.beta": 1.0}).bundles
    two = trial_resources(sweep)({"train.beta": 1.0, "train.processes": 2}).bundles
    assert one == [{"CPU": 1.0}] and two == [{"CPU": 2.0}]
    # a run the critic process cannot serve takes one process, and reserves one core
    taken_as_one = trial_resources(sweep)({"train.processes": 2, "train.target_rate": 0.01}).bundles
    assert taken_as_one == [{"CPU": 1.0}]


def test_trial_bundles_hold_the_actors_memory_reservations(tmp_path):
    """Inside a trial's placement group an actor's request, memory included, must fit its bundle."""
    sweep = load_sweep(_sweep_file(tmp_path))
    actors = {"train.beta": 1.0, "parallel.workers": 2, "parallel.num_cpus_per_worker": 0.5,
              "parallel.learner_num_cpus": 0.5, "parallel.memory_per_worker_mb": 64, "parallel.learner_memory_mb": 32}
    bundles = trial_resources(sweep)(actors).bundles
    assert bundles == [{"CPU": 1.0}, {"CPU": 0.5, "memory": 32 * 2**20}] + [{"CPU": 0.5, "memory": 64 * 2**20}] * 2
    unreserved = trial_resources(sweep)({**actors, "parallel.memory_per_worker_mb": None}).bundles
    assert unreserved[2:] == [{"CPU": 0.5}] * 2


def test_a_ddp_trial_reserves_its_process_and_trials_run_as_many_as_fit_with_their_workers(tmp_path):
    """Ray Train places ddp workers outside the trial's placement group: the trial holds its own process only, and
    trials that held every CPU would starve their workers, so concurrency is capped by what the cluster holds."""
    ddp = {**TINY, "parallel.mode": "ddp", "parallel.workers": 2, "parallel.num_cpus_per_worker": 0.5,
           "train.chunk_size": 8}
    sweep = load_sweep(_sweep_file(tmp_path, overrides=ddp))
    assert trial_resources(sweep)({"train.beta": 1.0}).bundles == [{"CPU": 1.0}]
    assert concurrent_trials(sweep, {"CPU": 2.0}) == 1 and concurrent_trials(sweep, {"CPU": 8.0}) == 4
    searched = load_sweep(_sweep_file(tmp_path, overrides=ddp, search_space={"parallel.workers": {"grid": [1, 4]}}))
    assert concurrent_trials(searched, {"CPU": 9.0}) == 3  # the largest trial: 1 + 4 x 0.5 CPUs
    assert concurrent_trials(searched, {"CPU": 1.0}) == 1  # Ray Train then says what it waits for
    gpus = load_sweep(_sweep_file(tmp_path, overrides={**ddp, "parallel.num_gpus_per_worker": 1}))
    assert concurrent_trials(gpus, {"CPU": 64.0, "GPU": 4.0}) == 2
    assert concurrent_trials(load_sweep(_sweep_file(tmp_path)), {"CPU": 2.0}) is None  # placement groups suffice


def test_report_points_continue_from_a_checkpoint():
    assert _report_points(0, 1000, 300) == [300, 600, 900, 1000]
    assert _report_points(600, 1000, 300) == [900, 1000]
    assert _report_points(0, 40, 20) == [20, 40]
    assert _report_points(40, 40, 20) == [40]  # restored at the end: evaluate and report again, no training


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.5), (0.5, 0.5), (0.8, 0.9), (2.0, 0.95), (0.9, 0.85), (0.5, 0.4)]
    assert pareto_front(points) == [1, 2, 3]


def _row(kl, reward, objective):
    return {"status": "ok", "kl_mean": kl, "reward_mean": reward, "objective": objective}


def test_constrained_objective_and_best_trial(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, search={"metric": "kl_mean", "mode": "min", "reward_target": 0.8}))
    assert sweep.objective({"kl_mean": 0.3, "reward_mean": 0.9}) == 0.3
    assert sweep.objective({"kl_mean": 0.3, "reward_mean": 0.7}) == pytest.approx(0.3 + PENALTY * 0.1)
    rows = [_row(0.2, 0.79, 0.3), _row(0.5, 0.85, 0.5), _row(0.4, 0.81, 0.4), {"status": "error"}]
    assert best_row(rows, sweep)["kl_mean"] == 0.4  # least KL among trials reaching the target
    assert best_row([_row(0.2, 0.7, 1.2), _row(0.1, 0.5, 3.1)], sweep)["kl_mean"] == 0.2  # none does
    maximise = load_sweep(_sweep_file(tmp_path, search={"metric": "reward_mean"}))
    assert maximise.search.mode == "max"
    assert best_row([_row(0.2, 0.7, 0.7), _row(0.9, 0.9, 0.9)], maximise)["reward_mean"] == 0.9


def test_kl_budget_objective_and_best_trial(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, search={"metric": "reward_mean", "kl_budget": 0.3}))
    assert sweep.search.mode == "max"
    assert sweep.objective({"kl_mean": 0.2, "reward_mean": 0.9}) == 0.9
    assert sweep.objective({"kl_mean": 0.4, "reward_mean": 0.9}) == pytest.approx(0.9 - PENALTY * 0.1)
    rows = [_row(0.2, 0.7, 0.7), _row(0.5, 0.95, -1.05), _row(0.3, 0.8, 0.8), {"status": "error"}]
    assert best_row(rows, sweep)["reward_mean"] == 0.8  # most reward within the budget
    assert best_row([_row(0.5, 0.9, -1.1), _row(0.4, 0.5, -0.5)], sweep)["kl_mean"] == 0.4  # none within: objective


def test_paper_sweep_proposes_with_tpe_over_its_ranges_and_stops_with_asha():
    sweep = load_sweep(ROOT / "tuning" / "swiss_roll.yaml")
    searcher = _search_alg(sweep)
    assert searcher.set_search_properties("objective", "min", param_space(sweep))
    assert type(searcher._ot_study.sampler).__name__ == "TPESampler"
    proposal = searcher.suggest("trial-0")
    assert 0.5 <= proposal["train.beta"] <= 4.0 and 1e-4 <= proposal["train.lr_value"] <= 3e-3
    scheduler = _scheduler(sweep)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._time_attr == "episode"


def _reward_pair_axes(fig):
    """The axes of pareto.png's first per-reward panel: its labels, the trials' points and the front's points."""
    ax = fig.axes[1]
    trials = [tuple(p) for p in ax.collections[-1].get_offsets().tolist()]
    front = list(zip(*(v.tolist() for v in ax.lines[0].get_data())))
    return ax.get_xlabel(), ax.get_ylabel(), trials, front


def test_pareto_figure_of_two_rewards_shows_their_trade_off():
    """Four trials with rewards a and b: the second panel plots b's mean against a's; its front keeps the trials no
    other beats on both rewards, (1, 0), (0.4, 0.5) and (0, 1), and drops (0.3, 0.3)."""
    def trial(a, b, kl):
        return {"status": "ok", "kl_mean": kl, "kl_ci95": 0.1, "reward_mean": a + b, "reward_ci95": 0.1,
                "reward_mean/a": a, "reward_ci95/a": 0.05, "reward_mean/b": b, "reward_ci95/b": 0.05}

    rows = [trial(1.0, 0.0, 0.3), trial(0.0, 1.0, 0.5), trial(0.3, 0.3, 0.1), trial(0.4, 0.5, 0.2),
            {"status": "error"}]
    fig = pareto_figure(rows, rows[0], None)
    assert len(fig.axes) == 3  # reward against KL, b against a, the colour bar (KL)
    x, y, trials, front = _reward_pair_axes(fig)
    assert (x, y) == ("reward_mean/a", "reward_mean/b")
    assert trials == [(1.0, 0.0), (0.0, 1.0), (0.3, 0.3), (0.4, 0.5)]
    assert front == [(1.0, 0.0), (0.4, 0.5), (0.0, 1.0)]
    single = [{k: v for k, v in row.items() if "/" not in k} for row in rows]
    assert len(pareto_figure(single, None, None).axes) == 1  # one reward: reward against KL alone


# ---- Ray ------------------------------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path, ray_session, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = _sweep_file(tmp_path, name="smoke", scheduler={"name": "asha", "grace_period": 20},
                       search={"algorithm": "grid", "metric": "kl_mean", "mode": "min", "reward_target": 0.45},
                       tracking={"wandb": True, "project": "distq-test"})
    outputs = run_sweep(path, echo=lambda line: None)
    experiment = tmp_path / "runs" / "smoke"
    assert outputs["experiment"] == experiment

    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert sorted(r["config/train.beta"] for r in rows) == [0.0, 1.0]
    for row in rows:
        assert row["status"] == "ok" and row["episode"] in (20, 40)
        assert {"reward_mean", "reward_ci95", "kl_mean", "kl_ci95", "objective", "loss/td"} <= set(row)
        assert row["config/sde.dt"] == 0.5 and row["config/train.episodes"] == 40

    best = load_config(experiment / "best.yaml")  # a ready-to-run training config
    assert best.train.beta == outputs["best"]["config/train.beta"] and best.train.episodes == 40
    assert (experiment / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = glob.glob(str(experiment / "*" / "wandb" / "offline-run-*"))
    assert not glob.glob(str(experiment / "*" / "run" / "wandb"))  # the trials' own runs are untracked: no double runs
    assert len(runs) == 2, runs  # one offline W&B run per trial, nothing sent anywhere
    assert all(glob.glob(os.path.join(run, "*.wandb")) for run in runs)
    images = glob.glob(str(experiment / "*" / "wandb" / "offline-run-*" / "files" / "media" / "images" / "samples_*"))
    assert images, [str(p.relative_to(experiment)) for p in experiment.glob("*/wandb/offline-run-*/files/**/*")]


def _terminated(experiment: Path) -> list[str]:
    """Trial ids the saved experiment state lists as finished."""
    done = []
    for state in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # caught mid-write
        done += [t["trial_id"] for t in (json.loads(item[0]) for item in trials) if t["status"] == "TERMINATED"]
    return done


def _kill_orphans(driver_pid: int) -> None:
    """Ray workers of the killed driver's instance that outlived it (they exit on their own within ~30 s): their
    session directory ends with the driver's pid."""
    kill_processes_with(f"_{driver_pid}/sockets".encode(), "cmdline")


def _result_lines(experiment: Path) -> dict[str, list[str]]:
    return {p.parent.name: p.read_text().splitlines() for p in experiment.glob("*/result.json")}


HELD_REWARD = """
import time
from pathlib import Path

HOLD = Path({hold!r})


def h(x):
    # while the file HOLD exists a trial waits here, after saying so: the sweep is then surely mid-trial
    if HOLD.exists():
        (HOLD.parent / "held").touch()
        deadline = time.monotonic() + 300
        while HOLD.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return x[:, 0]
"""


def _driver(path: Path, *flags: str) -> subprocess.Popen:
    """scripts/tune.py in a session of its own with an embedded Ray instance of its own."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "tune.py"), str(path), *flags], cwd=path.parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop(driver: subprocess.Popen, sig: int) -> str:
    """Send `sig`, wait for the driver, then kill what is left of its session and its Ray instance; its stderr."""
    try:
        os.kill(driver.pid, sig)
        return driver.communicate(timeout=120)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):  # after SIGTERM the driver stopped its Ray itself
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        _kill_orphans(driver.pid)


def _wait_for(event, driver: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 150
    while not event():
        assert driver.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_resumes_after_the_driver_is_stopped_and_after_it_is_killed(tmp_path, ray_session):
    """SIGTERM (a scheduler, `ray stop`) once a trial has finished: Tune saves its state, the driver exits 143 with
    one line saying how to continue. Its --resume is then SIGKILLed (a crash) while a trial is surely running (held
    at its reward). The next --resume finishes the sweep from Tune's last saved state: every trial once, a trial
    finished before any stop neither rerun nor reported again."""
    hold = tmp_path / "hold"
    (tmp_path / "held_reward.py").write_text(HELD_REWARD.format(hold=str(hold)))
    path = _sweep_file(tmp_path, name="resume", search_space={"train.beta": {"grid": [0.0, 0.5, 1.0]}},
                       overrides={**TINY, "train.episodes": 60, "reward.fn": f"{tmp_path / 'held_reward.py'}:h"})
    experiment = tmp_path / "runs" / "resume"

    driver = _driver(path)
    _wait_for(lambda: _terminated(experiment), driver, "a finished trial")
    err = _stop(driver, signal.SIGTERM)
    assert driver.returncode == 143, err[-2000:]
    assert err.splitlines()[-1].startswith("distq: sweep stopped by SIGTERM; its state is saved in ")
    assert err.splitlines()[-1].endswith(f"(continue with: distq tune {path} --resume)")
    finished = set(_terminated(experiment))
    assert 1 <= len(finished) < 3 and not (experiment / "results.parquet").exists()  # stopped mid-sweep
    before = _result_lines(experiment)

    hold.touch()
    driver = _driver(path, "--resume")
    _wait_for((tmp_path / "held").exists, driver, "a trial held at its reward")
    _stop(driver, signal.SIGKILL)
    hold.unlink()
    assert not (experiment / "results.parquet").exists()

    outputs = run_sweep(path, resume=True, echo=lambda line: None)
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert sorted(r["config/train.beta"] for r in rows) == [0.0, 0.5, 1.0]
    assert all(r["status"] == "ok" and r["episode"] == 60 for r in rows)
    after = _result_lines(experiment)
    for trial in before:
        if any(trial.startswith(f"run_trial_{trial_id}") for trial_id in finished):
            assert after[trial] == before[trial]  # a finished trial is neither rerun nor reported again
    assert outputs["best"] is not None and load_config(experiment / "best.yaml").train.episodes == 60


@pytest.mark.ray
@pytest.mark.slow
def test_a_ddp_trial_in_a_sweep_trains_the_in_process_run(tmp_path, ray_session):
    """One trial of parallel.mode = ddp with W = 1 (one Ray Train worker beside the trial's process on the session's
    2 CPUs; tests/test_data_parallel.py has W = 2): the in-process run's weights and metrics rows, with standardised data (the
    worker's rewards in the user's coordinates) and a list reward (each one's column)."""
    from distq.edges.sweep import config_from_flat
    from distq.runs.checkpoint import load_checkpoint
    from distq.training.trainer import train

    ddp = {**TINY, "parallel.mode": "ddp", "parallel.workers": 1, "parallel.num_cpus_per_worker": 0.5,
           "train.episodes": 6, "train.checkpoint_every": 3, "train.log_every": 1, "data.standardize": True,
           "reward.fn": ["swiss_roll_rectangle", "brightness"], "reward.weights": [1.0, 0.5]}
    path = _sweep_file(tmp_path, name="ddp", overrides=ddp, search_space={"train.beta": {"grid": [1.0]}},
                       report_every=6)
    run_sweep(path, echo=lambda line: None)
    (row,) = pq.read_table(tmp_path / "runs" / "ddp" / "results.parquet").to_pylist()
    assert row["status"] == "ok" and row["episode"] == 6 and row["workers"] == 1 and row["worker_restarts"] == 0
    (trial_run,) = (tmp_path / "runs" / "ddp").glob("*/run")
    in_process = config_from_flat({**load_sweep(path).base, "train.beta": 1.0, "parallel.workers": 0,
                                   "parallel.mode": "sync"})
    train(in_process, tmp_path / "in_process", echo=lambda line: None)
    runs = (trial_run, tmp_path / "in_process")
    ours, reference = (load_checkpoint(run / rundir.CHECKPOINT)["learner"] for run in runs)
    for part in ("policy", "value"):
        for name, tensor in reference[part].items():
            assert torch.allclose(ours[part][name], tensor, atol=1e-5), f"{part}.{name}"
    rows, ref_rows = (rundir.read_table_rows(run / rundir.METRICS) for run in runs)
    assert [r["episode"] for r in rows] == [r["episode"] for r in ref_rows] == list(range(1, 7))
    for ours_row, ref in zip(rows, ref_rows):
        for key in ("loss/td", "reward/terminal_mean", "reward/terminal_mean/swiss_roll_rectangle",
                    "reward/terminal_mean/brightness", "grad_norm/policy"):
            assert ours_row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (ours_row["episode"], key)


def test_a_sweep_over_reward_weights_validates(tmp_path):
    """A choice of list values for reward.weights: each checked by building its config; a bad one names the field."""
    overrides = {**TINY, "reward.fn": ["swiss_roll_rectangle", "linear"], "reward.coef": [1, 0]}
    choice = {"reward.weights": {"choice": [[1, 0], [0.5, 0.5], [0, 1]]}}
    sweep = load_sweep(_sweep_file(tmp_path, overrides=overrides, search_space=choice,
                                   search={"algorithm": "random", "num_samples": 3}))
    assert sweep.search_space[0].values == ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])
    with pytest.raises(DistqError, match="reward.weights"):
        load_sweep(_sweep_file(tmp_path, overrides=overrides, search_space={"reward.weights": {"choice": [[1]]}},
                               search={"algorithm": "random", "num_samples": 3}))


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_over_reward_weights_plots_each_reward_s_trade_off(tmp_path, ray_session):
    """Two trials, reward.weights (1, 0) and (0, 1) of [swiss_roll_rectangle, linear (1, 0)]: each trial reports each
    reward's mean, and pareto.png's second panel plots the linear reward's against the rectangle's, trial by trial."""
    overrides = {**TINY, "train.episodes": 4, "reward.fn": ["swiss_roll_rectangle", "linear"], "reward.coef": [1, 0],
                 "train.beta": 1.0}
    path = _sweep_file(tmp_path, name="weights", overrides=overrides, report_every=4,
                       search_space={"reward.weights": {"grid": [[1, 0], [0, 1]]}})
    outputs = run_sweep(path, echo=lambda line: None)
    experiment = tmp_path / "runs" / "weights"
    assert (experiment / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert sorted(tuple(r["config/reward.weights"]) for r in rows) == [(0.0, 1.0), (1.0, 0.0)]
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:  # each trial's reward is its weighted sum of the two
        weights = row["config/reward.weights"]
        mixed = weights[0] * row["reward_mean/swiss_roll_rectangle"] + weights[1] * row["reward_mean/linear"]
        assert row["reward_mean"] == pytest.approx(mixed, rel=1e-5)
    x, y, trials, _ = _reward_pair_axes(pareto_figure(rows, outputs["best"], None))
    assert (x, y) == ("reward_mean/swiss_roll_rectangle", "reward_mean/linear")
    assert trials == [(r["reward_mean/swiss_roll_rectangle"], r["reward_mean/linear"]) for r in rows]
