"""distq.edges.cli end to end, in-process: train / resume / sample / evaluate round trips, and every bad input refused.

Runs are tiny (64 points, K = 10, 20-40 episodes of 32 trajectories) so each takes about a second. Bad inputs
must give exit code 2, one line `distq: error: ...` naming the offending field or file, no traceback, and leave
an existing run directory byte-identical.
"""
import contextlib
import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distq.edges.cli import main
from distq.errors import DistqError
from distq.runs.checkpoint import load_checkpoint, save_checkpoint
from distq.setup.configfile import load_config

pytestmark = pytest.mark.plots  # its runs draw their PNGs (conftest: elsewhere they skip them)

TINY = {
    "seed": 0,
    "data": {"source": "swiss_roll", "n_samples": 64},
    "sde": {"T": 5.0, "dt": 0.5},
    "train": {"episodes": 20, "batch_size": 32, "chunk_size": 16, "log_every": 5, "checkpoint_every": 10},
    "eval": {"n_samples": 50, "batches": 2},
}
OUTPUTS = ("config.yaml", "metrics.parquet", "checkpoint.pt", "samples.parquet", "samples.png", "summary.json")
SUMMARY_KEYS = ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95", "kl_floor", "episodes", "wall_s",
                "episodes_per_s", "dim")
# Deterministic binary garbage; torch's weights-only unpickler rejects it with a multi-line explanation.
BINARY_GARBAGE = bytes(range(256)) * 4
TEXT_GARBAGE = b"this is not a checkpoint\n" * 10


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_config(directory: Path, name: str = "tiny.yaml", **sections) -> Path:
    """TINY with `sections` merged in, written as YAML into `directory`."""
    path = directory / name
    path.write_text(yaml.safe_dump(_merge(TINY, sections), sort_keys=False))
    return path


def run_cli(*argv) -> tuple[int, str, str]:
    """distq.edges.cli.main in-process -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (names and bytes), to check a refused command changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def assert_refused(code: int, err: str, *names) -> None:
    """Exit 2 and one `distq: error:` line naming each of `names`, without a traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), err
    for name in names:
        assert str(name) in err, f"{name!r} not named in: {err}"


def learner_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    learner = load_checkpoint(checkpoint)["learner"]
    return {f"{net}.{k}": v for net in ("policy", "value", "target") if net in learner for k, v in learner[net].items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """One tiny run trained through the CLI, shared read-only; tests that modify a run copy it (`run_dir`)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root, train={"episodes": 30})
    run = root / "run"
    code, out, err = run_cli("train", config, "--set", "train.episodes=20", "--set", "train.beta=0.5", "--out", run)
    return {"code": code, "out": out, "err": err, "run": run, "config": config,
            "overrides": ["train.episodes=20", "train.beta=0.5"]}


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A private copy of the shared run."""
    return Path(shutil.copytree(trained["run"], tmp_path / "run"))


# ---- train ----------------------------------------------------------------------------------------------------

def test_train_writes_every_output(trained):
    run = trained["run"]
    assert trained["code"] == 0, trained["err"]
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    assert (run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary.json" in trained["out"]


def test_train_summary_has_finite_headline_metrics(trained):
    summary = json.loads((trained["run"] / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary and math.isfinite(summary[key]), key
    assert summary["episodes"] == 20 and summary["dim"] == 2
    assert summary["wall_s"] > 0 and summary["episodes_per_s"] > 0
    assert summary["reward_ci95"] >= 0 and summary["kl_ci95"] >= 0


def test_train_metrics_one_row_per_logged_episode(trained):
    rows = pq.read_table(trained["run"] / "metrics.parquet").to_pylist()
    assert [r["episode"] for r in rows] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss/td"]) for r in rows)


def test_train_samples_and_checkpoint(trained):
    samples = pq.read_table(trained["run"] / "samples.parquet")
    assert samples.column_names == ["x0", "x1"] and samples.num_rows == 50 * 2
    payload = load_checkpoint(trained["run"] / "checkpoint.pt")
    assert payload["episode"] == 20 and payload["columns"] == ["x0", "x1"]


def test_train_config_yaml_reloads_to_the_resolved_config(trained):
    resolved = load_config(trained["config"], trained["overrides"])
    assert resolved.train.episodes == 20 and resolved.train.beta == 0.5
    assert load_config(trained["run"] / "config.yaml") == resolved


def test_train_accepts_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string; the documented `--set train.lr_policy=3e-4` must still work.
    code, _, err = run_cli("train", write_config(tmp_path), "--set", "train.lr_policy=3e-4", "--out", tmp_path / "run")
    assert code == 0, err
    assert load_config(tmp_path / "run" / "config.yaml").train.lr_policy == 3e-4


# ---- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections", [{}, {"train": {"beta": 1.0, "target_rate": 0.05},
                                           "model": {"value_prior": "posterior_reward"}}])
def test_resume_matches_a_straight_run(tmp_path, sections):
    """20 episodes + resume to 40 == 40 episodes: optimiser state, counter-based randomness and the target network
    are restored."""
    config = write_config(tmp_path, **sections)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert run_cli("train", config, "--out", resumed)[0] == 0
    code, _, err = run_cli("train", "--resume", resumed, "--set", "train.episodes=40")
    assert code == 0, err
    assert run_cli("train", config, "--set", "train.episodes=40", "--out", straight)[0] == 0

    assert load_checkpoint(resumed / "checkpoint.pt")["episode"] == 40
    a, b = learner_tensors(resumed / "checkpoint.pt"), learner_tensors(straight / "checkpoint.pt")
    assert a.keys() == b.keys() and any(k.startswith("target") for k in a) == bool(sections)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    rows_a = pq.read_table(resumed / "metrics.parquet").to_pylist()
    rows_b = pq.read_table(straight / "metrics.parquet").to_pylist()
    assert [r["episode"] for r in rows_a] == [r["episode"] for r in rows_b] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert np.allclose([r["loss/td"] for r in rows_a], [r["loss/td"] for r in rows_b], rtol=1e-5)
    assert json.loads((resumed / "summary.json").read_text())["episodes"] == 40


@pytest.mark.parametrize("processes", [1, 2])
def test_the_policy_average_is_what_a_run_evaluates_samples_and_hands_on(tmp_path, processes):
    """train.ema_rate: training's own evaluation, `distq evaluate`, `distq sample` and --init use the moving average
    (at rate 1e-9 still the initial policy), not the trained weights."""
    run, config = tmp_path / "run", write_config(tmp_path, train={"ema_rate": 1e-9, "processes": processes})
    assert run_cli("train", config, "--out", run)[0] == 0
    payload = load_checkpoint(run / "checkpoint.pt")
    average, trained = payload["learner"]["policy_average"], payload["learner"]["policy"]
    assert not all(torch.allclose(average[k], trained[k], atol=1e-4) for k in trained)

    def outputs() -> tuple[dict, np.ndarray]:
        code, stdout, err = run_cli("evaluate", run)
        assert code == 0, err
        assert run_cli("sample", run, "-n", 40, "--out", tmp_path / "s.parquet")[0] == 0
        return json.loads(stdout), np.array(pq.read_table(tmp_path / "s.parquet").to_pylist()[0]["x1"])

    summary = json.loads((run / "summary.json").read_text())
    evaluated, sampled = outputs()
    assert evaluated["kl_mean"] == pytest.approx(summary["kl_mean"], abs=1e-9)
    plain = {k: v for k, v in payload["learner"].items() if k != "policy_average"}
    for weights, same in ((average, True), (trained, False)):  # the checkpoint without an average
        save_checkpoint(run / "checkpoint.pt", {**payload, "learner": {**plain, "policy": weights}})
        other_evaluation, other_samples = outputs()
        assert (other_evaluation["kl_mean"] == pytest.approx(evaluated["kl_mean"], abs=1e-9)) == same
        assert np.allclose(other_samples, sampled, atol=1e-6) == same
    save_checkpoint(run / "checkpoint.pt", payload)

    # one update at a negligible learning rate from --init: the new run's policy is the average it started from
    code, _, err = run_cli("train", write_config(tmp_path, "plain.yaml"), "--init", run, "--out", tmp_path / "tuned",
                           "--set", "train.episodes=1", "--set", "train.lr_policy=1e-12")
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "tuned" / "checkpoint.pt")["learner"]["policy"]
    assert all(torch.allclose(tuned[k], average[k], atol=1e-8) for k in average)


def test_resume_with_explicit_config_and_same_out(tmp_path):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    assert run_cli("train", config, "--out", run)[0] == 0
    code, _, err = run_cli("train", config, "--resume", run, "--out", run, "--set", "train.episodes=25")
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == 25


@pytest.mark.parametrize("method", ["qlearning", "dsm"])
def test_pretrain_is_train_at_beta_zero_and_starts_other_runs(tmp_path, method):
    """`distq pretrain` forces beta = 0 and the method's algorithm (dsm unweighted: no effective sample size), resumes
    as the same method, and its run is an --init for fine-tuning."""
    config = write_config(tmp_path, train={"beta": 2.0})
    pretrained = tmp_path / "pretrained"
    code, out, err = run_cli("pretrain", config, "--method", method, "--out", pretrained)
    assert code == 0, err
    saved = load_config(pretrained / "config.yaml")
    assert saved.train.beta == 0.0 and saved.train.algorithm == method
    assert "ess" not in json.loads((pretrained / "summary.json").read_text())
    code, _, err = run_cli("pretrain", "--resume", pretrained, "--set", "train.episodes=25")
    assert code == 0, err
    assert load_checkpoint(pretrained / "checkpoint.pt")["episode"] == 25
    code, _, err = run_cli("train", config, "--init", pretrained, "--set", "train.episodes=2", "--out", tmp_path / "tuned")
    assert code == 0, err
    assert load_config(tmp_path / "tuned" / "config.yaml").train.init == str(pretrained)


def test_resume_to_fewer_episodes_is_refused(run_dir):
    before = snapshot(run_dir)
    code, _, err = run_cli("train", "--resume", run_dir, "--set", "train.episodes=10")
    assert_refused(code, err, "train.episodes")
    assert snapshot(run_dir) == before


# ---- refusing to clobber a run --------------------------------------------------------------------------------

def test_train_into_existing_run_is_refused_and_changes_nothing(trained, run_dir):
    before = snapshot(run_dir)
    code, _, err = run_cli("train", trained["config"], "--out", run_dir)
    assert_refused(code, err, run_dir, "--resume", "--overwrite")
    assert snapshot(run_dir) == before


def test_overwrite_replaces_the_run_and_only_its_files(trained, run_dir):
    (run_dir / "evaluation.json").write_text("{}")  # a stale evaluation of the old model
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run_cli("train", trained["config"], "--set", "seed=1", "--out", run_dir, "--overwrite")
    assert code == 0, err
    assert load_config(run_dir / "config.yaml").seed == 1
    assert load_checkpoint(run_dir / "checkpoint.pt")["config"]["seed"] == 1
    assert not (run_dir / "evaluation.json").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_out_that_is_a_file_is_refused(trained, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep")
    assert_refused(*run_cli("train", trained["config"], "--out", target)[::2], target)
    assert target.read_text() == "keep"


def test_out_below_a_file_is_refused(trained, tmp_path):
    (tmp_path / "a_file").write_text("keep")
    target = tmp_path / "a_file" / "run"
    assert_refused(*run_cli("train", trained["config"], "--out", target)[::2], target)


def test_train_argument_combinations_refused(trained, tmp_path):
    assert_refused(*run_cli("train", trained["config"])[::2], "--out")
    assert_refused(*run_cli("train", "--resume", trained["run"], "--out", tmp_path / "other")[::2], "--resume")


# ---- sample ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--sampler", "ode_euler", "--steps", "10"], ["--sampler", "ddim", "--steps", "10"],
                                   ["--sampler", "ddim", "--steps", "3"], []])
def test_sample_writes_n_rows_with_data_columns(trained, tmp_path, extra):
    out = tmp_path / "sub" / "samples.parquet"
    code, stdout, err = run_cli("sample", trained["run"], "-n", 123, "--out", out, *extra)
    assert code == 0, err
    table = pq.read_table(out)
    assert table.num_rows == 123 and table.column_names == ["x0", "x1"]
    values = np.stack([table.column(c).to_numpy() for c in table.column_names], 1)
    assert np.isfinite(values).all() and values.std(0).min() > 0
    assert "123" in stdout


def test_sample_is_deterministic_given_seed(trained, tmp_path):
    paths = [tmp_path / f"{name}.parquet" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1)):
        assert run_cli("sample", trained["run"], "-n", 20, "--out", path, "--seed", seed)[0] == 0
    a, b, c = (pq.read_table(p).to_pylist() for p in paths)
    assert a == b and a != c


def test_sample_grid_power_changes_the_grid_only(trained, tmp_path):
    """--grid-power 1 is the run's own (uniform) grid; 2 moves the steps towards the data, so other samples."""
    paths = {name: tmp_path / f"{name}.parquet" for name in ("run", "one", "two")}
    for name, extra in (("run", []), ("one", ["--grid-power", 1]), ("two", ["--grid-power", 2])):
        code, out, err = run_cli("sample", trained["run"], "-n", 20, "--out", paths[name], *extra)
        assert code == 0, err
    assert "grid power 2" in out
    run, one, two = (pq.read_table(p).to_pylist() for p in paths.values())
    assert run == one and run != two


@pytest.mark.parametrize("args, name", [(["-n", 0], "-n"), (["-n", 5, "--steps", 0], "--steps"),
                                        (["-n", 5, "--grid-power", 0], "--grid-power"),
                                        (["-n", 5, "--grid-power", "nan"], "--grid-power")])
def test_sample_bad_counts_refused(trained, tmp_path, args, name):
    assert_refused(*run_cli("sample", trained["run"], "--out", tmp_path / "s.parquet", *args)[::2], name)
    assert not (tmp_path / "s.parquet").exists()


def test_sample_out_that_is_a_directory_is_refused(run_dir, tmp_path):
    target = tmp_path / "a_dir"
    target.mkdir()
    assert_refused(*run_cli("sample", run_dir, "-n", 5, "--out", target)[::2], target)
    assert not (tmp_path / "a_dir.tmp").exists()


# ---- file data: column names ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def file_run(tmp_path_factory) -> dict:
    """A run on a Parquet file with named columns and a linear reward."""
    root = tmp_path_factory.mktemp("file_run")
    points = np.random.default_rng(0).normal(size=(64, 2)) * [2.0, 1.0] + [1.0, -1.0]
    pq.write_table(pa.table({"height": points[:, 0], "weight": points[:, 1]}), root / "data.parquet")
    config = write_config(root, data={"source": "file", "path": str(root / "data.parquet")},
                          reward={"fn": "linear", "coef": [1.0, 0.0]})
    code, _, err = run_cli("train", config, "--out", root / "run")
    assert code == 0, err
    return {"run": root / "run", "root": root}


def test_file_run_samples_use_the_file_columns(file_run):
    run = file_run["run"]
    assert pq.read_table(run / "samples.parquet").column_names == ["height", "weight"]
    out = file_run["root"] / "sampled.parquet"
    assert run_cli("sample", run, "-n", 123, "--out", out, "--sampler", "ode_euler", "--steps", 10)[0] == 0
    table = pq.read_table(out)
    assert table.num_rows == 123 and table.column_names == ["height", "weight"]
    code, stdout, err = run_cli("evaluate", run, "--samples", out)
    assert code == 0, err
    assert math.isfinite(json.loads(stdout)["reward_mean"])


def test_file_run_kl_floor_is_near_zero(file_run):
    summary = json.loads((file_run["run"] / "summary.json").read_text())
    assert abs(summary["kl_floor"]) < 1.0, summary["kl_floor"]


# ---- evaluate -------------------------------------------------------------------------------------------------

def test_evaluate_reproduces_the_training_evaluation(run_dir):
    code, stdout, err = run_cli("evaluate", run_dir)
    assert code == 0, err
    printed = json.loads(stdout)
    assert json.loads((run_dir / "evaluation.json").read_text()) == printed
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95", "kl_floor"):
        assert printed[key] == pytest.approx(summary[key], abs=1e-9), key


def test_evaluate_given_samples(run_dir, tmp_path):
    # The run's own samples: the same points, so the same mean reward as in summary.json.
    code, stdout, err = run_cli("evaluate", run_dir, "--samples", run_dir / "samples.parquet")
    assert code == 0, err
    printed = json.loads(stdout)
    assert json.loads((run_dir / "evaluation.json").read_text()) == printed
    assert printed["reward_mean"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["reward_mean"])
    assert printed["samples"] == str(run_dir / "samples.parquet")
    sampled = tmp_path / "sampled.parquet"
    assert run_cli("sample", run_dir, "-n", 123, "--out", sampled, "--sampler", "ddim", "--steps", 10)[0] == 0
    code, stdout, err = run_cli("evaluate", run_dir, "--samples", sampled)
    assert code == 0, err
    assert all(math.isfinite(json.loads(stdout)[k]) for k in ("reward_mean", "kl_mean", "kl_floor"))


def test_evaluate_batches(run_dir, tmp_path):
    """--batches overrides eval.batches (tiny run: 2 of 50): generated, 5 batches; from a file of 123 samples, the 2
    whole batches it holds; below 2, refused without touching the run."""
    code, stdout, err = run_cli("evaluate", run_dir, "--batches", 5)
    assert code == 0, err
    assert json.loads(stdout)["n_samples"] == 250
    sampled = tmp_path / "sampled.parquet"
    assert run_cli("sample", run_dir, "-n", 123, "--out", sampled)[0] == 0
    code, stdout, err = run_cli("evaluate", run_dir, "--samples", sampled, "--batches", 5)
    assert code == 0, err
    assert json.loads(stdout)["n_samples"] == 100
    before = snapshot(run_dir)
    assert_refused(*run_cli("evaluate", run_dir, "--batches", 1)[::2], "--batches")
    assert snapshot(run_dir) == before


def test_evaluate_bad_samples_files_refused(run_dir, tmp_path):
    before = snapshot(run_dir)
    missing = tmp_path / "missing.parquet"
    assert_refused(*run_cli("evaluate", run_dir, "--samples", missing)[::2], missing)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"x0": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]}), wrong)
    assert_refused(*run_cli("evaluate", run_dir, "--samples", wrong)[::2], wrong, "x1")
    assert snapshot(run_dir) == before


# ---- evaluate --samples of a conditional run (Algorithm 2) ------------------------------------------------------

@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory) -> dict:
    """A tiny run on the Swiss roll cut into 2 conditions (values 0, 1) with the reward h(x, c) = x_0 + 10 c."""
    root = tmp_path_factory.mktemp("conditional_run")
    (root / "cond_reward.py").write_text("def h(x, c):\n    return x[:, 0] + 10.0 * c\n")
    config = write_config(root, data={"source": "swiss_roll", "n_samples": 200, "condition": "label", "classes": 2},
                          reward={"fn": f"{root / 'cond_reward.py'}:h"}, train={"beta": 0.1})
    code, _, err = run_cli("train", config, "--out", root / "run")
    assert code == 0, err
    return {"run": root / "run", "root": root, "config": load_config(config)}


def _evaluate_json(run: Path, samples: Path) -> dict:
    code, stdout, err = run_cli("evaluate", run, "--samples", samples)
    assert code == 0, err
    return json.loads(stdout)


def test_conditional_samples_evaluate_with_the_training_metrics(conditional_run, tmp_path):
    """The run's own samples.parquet (samples and conditions of the training evaluation) give summary.json's reward
    and the same per-condition metric names; `distq sample` files (mixed, and one condition) evaluate too."""
    run = conditional_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    own = _evaluate_json(run, run / "samples.parquet")
    assert own["reward_mean"] == pytest.approx(summary["reward_mean"])
    assert {value: set(m) for value, m in own["per_condition"].items()} == {
        value: set(m) for value, m in summary["per_condition"].items()}
    mixed, right = tmp_path / "mixed.parquet", tmp_path / "right.parquet"
    assert run_cli("sample", run, "-n", 300, "--out", mixed)[0] == 0
    assert run_cli("sample", run, "-n", 120, "--out", right, "--condition", 1)[0] == 0
    assert set(_evaluate_json(run, mixed)["per_condition"]) == {"0", "1"}
    one = _evaluate_json(run, right)
    assert set(one["per_condition"]) == {"1"} and one["reward_mean"] == one["per_condition"]["1"]["reward_mean"]
    assert all(math.isfinite(v) for v in one["per_condition"]["1"].values())


def test_one_condition_s_data_give_its_reward_by_hand_and_a_small_kl(conditional_run, tmp_path):
    """Condition 1's training points evaluated as condition 1: reward mean(x_0) + 10, and KL near zero against
    condition 1's law; the same points labelled 0 are far from condition 0's law."""
    from distq.problems.data import load_dataset

    run, config = conditional_run["run"], conditional_run["config"]
    dataset = load_dataset(config.data, config.seed)
    points = dataset.points[dataset.labels == 1].numpy().astype(np.float64)
    for label in (0, 1):
        pq.write_table(pa.table({"x0": points[:, 0], "x1": points[:, 1], "label": [label] * len(points)}),
                       tmp_path / f"as{label}.parquet")
    as1, as0 = (_evaluate_json(run, tmp_path / f"as{label}.parquet") for label in (1, 0))
    used = min(len(points) // 50, 2) * 50  # eval: consecutive batches of 50, at most 2
    assert as1["per_condition"]["1"]["reward_mean"] == pytest.approx(points[:used, 0].mean() + 10.0, abs=1e-4)
    assert as0["per_condition"]["0"]["reward_mean"] == pytest.approx(points[:used, 0].mean(), abs=1e-4)
    assert as1["per_condition"]["1"]["kl_mean"] < 0.5 < 2.0 < as0["per_condition"]["0"]["kl_mean"]


def test_conditional_samples_without_their_conditions_refused(conditional_run, tmp_path):
    run = conditional_run["run"]
    before = snapshot(run)
    table = pq.read_table(run / "samples.parquet")
    cases = {"no_label": table.drop(["label"]), "seven": table.set_column(2, "label", pa.array([7] * table.num_rows)),
             "text": table.set_column(2, "label", pa.array(["one"] * table.num_rows))}
    for name, bad in cases.items():
        pq.write_table(bad, tmp_path / f"{name}.parquet")
        assert_refused(*run_cli("evaluate", run, "--samples", tmp_path / f"{name}.parquet")[::2],
                       tmp_path / f"{name}.parquet", "label")
    lonely = pa.table({"x0": [0.0] * 60 + [1.0], "x1": [0.0] * 60 + [1.0], "label": [1] * 60 + [0]})
    pq.write_table(lonely, tmp_path / "lonely.parquet")
    assert_refused(*run_cli("evaluate", run, "--samples", tmp_path / "lonely.parquet")[::2], "1 samples of condition 0",
                   "eval.k + 1 = 2")
    assert snapshot(run) == before


# ---- bad inputs -----------------------------------------------------------------------------------------------

def _reward_file(directory: Path, body: str, name: str = "user_reward.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def _data_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _file_config(directory: Path, path: Path) -> Path:
    return write_config(directory, "file.yaml", data={"source": "file", "path": str(path)})


def _reward_config(directory: Path, reference: str) -> Path:
    return write_config(directory, "reward.yaml", reward={"fn": reference})


RETURNS_POINTS = "def h(x):\n    return x\n"
RETURNS_NAN = "def h(x):\n    return x[:, 0] * float('nan')\n"
RAISES = "def h(x):\n    raise ValueError('no reward today')\n"

# Each case: (tmp directory) -> (the `distq train` arguments before --out, names the message must contain).
BAD_TRAIN_INPUTS = {
    "unknown key in yaml": lambda d: ([write_config(d, train={"epochs": 5})], ["train.epochs"]),
    "unknown key in --set": lambda d: ([write_config(d), "--set", "model.width=3"], ["model.width"]),
    "misspelled key": lambda d: ([write_config(d), "--set", "train.episdoes=5"], ["train.episdoes", "train.episodes"]),
    "unknown section": lambda d: ([write_config(d), "--set", "trian.beta=1.0"], ["trian"]),
    "mistyped int": lambda d: ([write_config(d), "--set", "train.episodes=many"], ["train.episodes"]),
    "mistyped float": lambda d: ([write_config(d), "--set", "train.beta=high"], ["train.beta"]),
    "fractional int": lambda d: ([write_config(d), "--set", "train.batch_size=2.5"], ["train.batch_size"]),
    "mistyped list": lambda d: ([write_config(d), "--set", "data.mean=abc"], ["data.mean"]),
    "section not a mapping": lambda d: ([write_config(d), "--set", "train=5"], ["train"]),
    "dt not dividing T": lambda d: ([write_config(d), "--set", "sde.dt=0.3"], ["sde.dt"]),
    "temperature zero": lambda d: ([write_config(d), "--set", "train.temperature=0"], ["train.temperature"]),
    "temperature negative": lambda d: ([write_config(d), "--set", "train.temperature=-1.0"], ["train.temperature"]),
    "beta NaN": lambda d: ([write_config(d), "--set", "train.beta=.nan"], ["train.beta"]),
    "eval k too large": lambda d: ([write_config(d), "--set", "eval.k=49"], ["eval.k"]),
    "unknown sampler": lambda d: ([write_config(d), "--set", "sde.sampler=heun"], ["sde.sampler"]),
    "config file missing": lambda d: ([d / "nope.yaml"], [d / "nope.yaml"]),
    "config not a mapping": lambda d: ([_data_file(d, "list.yaml", "- 1\n- 2\n")], [d / "list.yaml"]),
    "data file missing": lambda d: ([_file_config(d, d / "nope.csv")], [d / "nope.csv", "data.path"]),
    "data file empty": lambda d: ([_file_config(d, _data_file(d, "empty.csv", ""))], [d / "empty.csv"]),
    "data file header only": lambda d: ([_file_config(d, _data_file(d, "header.csv", "a,b\n"))], [d / "header.csv"]),
    "non-numeric column": lambda d: ([_file_config(d, _data_file(d, "text.csv", "a,label\n1,x\n2,y\n3,z\n"))],
                                     [d / "text.csv", "label"]),
    "NaN in data": lambda d: ([_file_config(d, _data_file(d, "nan.csv", "a,b\n1,2\n3,nan\n5,6\n"))],
                              [d / "nan.csv", "'b'", "row 1"]),
    "unknown data column": lambda d: ([write_config(d, "cols.yaml", data={"source": "file", "columns": ["c"], "path": str(
        _data_file(d, "ok.csv", "a,b\n1,2\n3,4\n"))})], ["data.columns", "'c'"]),
    "reward file missing": lambda d: ([_reward_config(d, f"{d / 'nope.py'}:h")], [d / "nope.py", "reward.fn"]),
    "reward import fails": lambda d: ([_reward_config(d, f"{_reward_file(d, 'import no_such_module_distq_xyz')}:h")],
                                      ["user_reward.py", "no_such_module_distq_xyz"]),
    "reward syntax error": lambda d: ([_reward_config(d, f"{_reward_file(d, 'def h(x) return x')}:h")],
                                      ["user_reward.py", "SyntaxError"]),
    "reward attribute missing": lambda d: ([_reward_config(d, f"{_reward_file(d, 'x = 1')}:h")], ["'h'"]),
    "reward wrong shape": lambda d: ([_reward_config(d, f"{_reward_file(d, RETURNS_POINTS)}:h")],
                                     ["reward.fn", "shape"]),
    "reward NaN": lambda d: ([_reward_config(d, f"{_reward_file(d, RETURNS_NAN)}:h")], ["reward.fn", "non-finite"]),
    "reward raises": lambda d: ([_reward_config(d, f"{_reward_file(d, RAISES)}:h")], ["reward.fn", "ValueError"]),
    "unknown builtin reward": lambda d: ([_reward_config(d, "rectangle")], ["reward.fn", "rectangle"]),
    "linear coef of wrong length": lambda d: ([write_config(d, reward={"fn": "linear", "coef": [1.0, 0.0, 0.0]})],
                                              ["reward.coef"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_INPUTS))
def test_bad_train_input_refused_and_run_unchanged(case, run_dir, tmp_path):
    """Even with --overwrite, a bad input is caught before the existing run is touched."""
    args, names = BAD_TRAIN_INPUTS[case](tmp_path)
    before = snapshot(run_dir)
    code, _, err = run_cli("train", *args, "--out", run_dir, "--overwrite")
    assert_refused(code, err, *names)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("where", ["file", "override"])
def test_invalid_yaml_refused_on_one_line(where, run_dir, tmp_path):
    if where == "file":
        path = _data_file(tmp_path, "broken.yaml", "train:\n  episodes: [1, 2\nseed: 0\n")
        args, name = [path], path
    else:
        args, name = [write_config(tmp_path), "--set", "train.episodes=[1"], "train.episodes"
    code, _, err = run_cli("train", *args, "--out", run_dir, "--overwrite")
    assert_refused(code, err, name)


def test_resume_with_a_different_config_names_the_field(run_dir):
    before = snapshot(run_dir)
    code, _, err = run_cli("train", "--resume", run_dir, "--set", "train.beta=1.0")
    assert_refused(code, err, "train.beta", "checkpoint.pt")
    assert snapshot(run_dir) == before


def test_resume_without_checkpoint_refused(run_dir, tmp_path):
    (run_dir / "checkpoint.pt").unlink()
    before = snapshot(run_dir)
    assert_refused(*run_cli("train", "--resume", run_dir)[::2], run_dir / "checkpoint.pt")
    assert snapshot(run_dir) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(*run_cli("train", "--resume", empty)[::2], empty)
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("command", ["resume", "sample", "evaluate"])
def test_corrupt_checkpoint_refused(command, run_dir, tmp_path):
    (run_dir / "checkpoint.pt").write_bytes(TEXT_GARBAGE)
    before = snapshot(run_dir)
    argv = {"resume": ["train", "--resume", run_dir],
            "sample": ["sample", run_dir, "-n", 5, "--out", tmp_path / "s.parquet"],
            "evaluate": ["evaluate", run_dir]}[command]
    assert_refused(*run_cli(*argv)[::2], run_dir / "checkpoint.pt")
    assert snapshot(run_dir) == before
    assert not (tmp_path / "s.parquet").exists()


def test_binary_garbage_checkpoint_refused(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(BINARY_GARBAGE)
    code, _, err = run_cli("evaluate", run_dir)
    assert code == 2 and "Traceback" not in err and str(run_dir / "checkpoint.pt") in err
    assert not (run_dir / "evaluation.json").exists()


def test_binary_garbage_checkpoint_message_is_one_line(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(BINARY_GARBAGE)
    code, _, err = run_cli("evaluate", run_dir)
    assert_refused(code, err, run_dir / "checkpoint.pt")
    assert "weights_only` set to `False`" not in err


def test_checkpoint_missing_fields_refused(run_dir):
    save_checkpoint(run_dir / "checkpoint.pt", {"episode": 3})
    assert_refused(*run_cli("evaluate", run_dir)[::2], run_dir / "checkpoint.pt", "config")


def test_console_script_exit_code_and_message(tmp_path):
    """The installed `distq` entry point turns main's return value into the process exit status."""
    script = Path(sys.executable).with_name("distq")
    done = subprocess.run([str(script), "train", "--resume", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert_refused(done.returncode, done.stderr, tmp_path)


# ---- divergence -----------------------------------------------------------------------------------------------

EXPLODING_REWARD = """\
    import torch

    calls = 0


    def h(x):
        # Calls: 1 = load_reward's probe, 2 = the value network's scale, 2 + k = episode k.
        global calls
        calls += 1
        return x[:, 0] * 0 + (1e30 if calls > 2 + 6 else 1.0)
"""


def test_divergence_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    """A finite reward of 1e30 from episode 7 overflows the float32 TD loss; checkpoints every 2 episodes."""
    reward = _reward_file(tmp_path, EXPLODING_REWARD)
    config = write_config(tmp_path, reward={"fn": f"{reward}:h"}, train={"beta": 1.0, "checkpoint_every": 2})
    run = tmp_path / "run"
    code, _, err = run_cli("train", config, "--out", run)
    assert_refused(code, err, "TD loss", "episode 7", run / "checkpoint.pt")
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["episode"] == 6
    assert all(torch.isfinite(v).all() for v in learner_tensors(run / "checkpoint.pt").values())
    assert [r["episode"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [5]


def test_huge_learning_rate_stops_with_a_message(tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli("train", write_config(tmp_path, train={"lr_policy": 1e30, "checkpoint_every": 1}),
                           "--out", run)
    assert_refused(code, err, "train.lr_policy")
    assert load_checkpoint(run / "checkpoint.pt")["episode"] >= 1


def test_checkpoint_of_an_older_distq_without_newer_keys_still_resumes(tmp_path):
    """A config written before keys existed (e.g. train.algorithm) compares as their defaults, so it resumes."""
    from distq.runs.checkpoint import config_differences
    from distq.setup.config import config_from_dict

    config = config_from_dict({"train": {"episodes": 5}})
    saved = config.to_dict()
    for key in ("algorithm", "init", "processes", "kl_weight", "device"):
        del saved["train"][key]
    for key in ("rollout_device", "memory_per_worker_mb", "learner_memory_mb"):
        del saved["parallel"][key]
    assert config_differences(saved, config) == []
    saved["train"]["beta"] = 2.0
    assert config_differences(saved, config) == ["train.beta"]


def _as_if_trained_on_a_gpu(run: Path) -> None:
    """The run's config.yaml and checkpoint name cuda for the learner and the rollouts (its tensors are CPU tensors,
    as distq saves them whatever the device)."""
    payload = load_checkpoint(run / "checkpoint.pt")
    payload["config"]["train"]["device"] = payload["config"]["parallel"]["rollout_device"] = "cuda"
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in payload.items() if k != "format"})
    (run / "config.yaml").write_text(yaml.safe_dump(payload["config"], sort_keys=False))


def test_a_run_trained_on_a_gpu_samples_evaluates_and_resumes_on_a_machine_without_one(run_dir, tmp_path):
    _as_if_trained_on_a_gpu(run_dir)
    out = tmp_path / "s.parquet"
    assert_refused(*run_cli("sample", run_dir, "-n", 5, "--out", out)[::2], "parallel.rollout_device", "--device")
    assert run_cli("sample", run_dir, "-n", 5, "--out", out, "--device", "cpu")[0] == 0
    assert pq.read_table(out).num_rows == 5
    assert run_cli("evaluate", run_dir, "--device", "auto")[0] == 0
    before = snapshot(run_dir)
    assert_refused(*run_cli("train", "--resume", run_dir, "--set", "train.episodes=25")[::2], "is cuda")
    assert snapshot(run_dir) == before
    code, _, err = run_cli("train", "--resume", run_dir, "--set", "train.episodes=25", "--set", "train.device=cpu",
                           "--set", "parallel.rollout_device=cpu")
    assert code == 0, err
    assert load_checkpoint(run_dir / "checkpoint.pt")["episode"] == 25


# ---- damaged checkpoints, the run directory's lock, failing disks, failed starts ------------------------------

def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
@pytest.mark.parametrize("command", ["sample", "evaluate", "resume", "init"])
def test_flipped_bytes_in_a_real_checkpoint_stop_every_reader(command, fraction, run_dir, tmp_path):
    checkpoint = run_dir / "checkpoint.pt"
    _flip(checkpoint, int(checkpoint.stat().st_size * fraction))
    before = snapshot(run_dir)
    argv = {"sample": ["sample", run_dir, "-n", 5, "--out", tmp_path / "s.parquet"],
            "evaluate": ["evaluate", run_dir],
            "resume": ["train", "--resume", run_dir, "--set", "train.episodes=25"],
            "init": ["train", write_config(tmp_path), "--init", run_dir, "--out", tmp_path / "tuned"]}[command]
    code, _, err = run_cli(*argv)
    assert_refused(code, err, f"checkpoint {checkpoint} is corrupt (checksum mismatch)")
    assert snapshot(run_dir) == before


def test_a_run_directory_in_use_is_refused_naming_the_holder(trained, run_dir):
    """Two writers of one directory (two `--overwrite` trainings, or an evaluation during training)."""
    from distq.runs import rundir

    before = snapshot(run_dir)
    with rundir.locked(run_dir, "--out"):
        for argv in (["train", trained["config"], "--out", run_dir, "--overwrite"], ["train", "--resume", run_dir],
                     ["evaluate", run_dir], ["calibrate", trained["config"], "--target-reward", 0.5, "--out", run_dir]):
            assert_refused(*run_cli(*argv)[::2], f"in use by process {os.getpid()}")
    assert snapshot(run_dir) == before


def test_an_unwritable_run_directory_is_found_before_training(trained, tmp_path, monkeypatch):
    """As root a read-only mode stops nothing: the probe write fails instead."""
    from distq.runs import rundir

    def read_only(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.Path, "write_bytes", read_only)
    steps = []
    monkeypatch.setattr("distq.training.trainer.Trainer.step", lambda self: steps.append(1))
    run = tmp_path / "run"
    assert_refused(*run_cli("train", trained["config"], "--out", run)[::2], "cannot write in", run, "Permission denied")
    assert steps == [] and list(run.iterdir()) == []


def test_too_little_free_space_is_refused_before_training(trained, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    run = tmp_path / "run"
    assert_refused(*run_cli("train", trained["config"], "--out", run)[::2], run, "1 MiB free")
    assert list(run.iterdir()) == []


def test_a_full_disk_at_the_plot_keeps_the_checkpoint(trained, tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def full(self, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", full)
    run = tmp_path / "run"
    code, _, err = run_cli("train", trained["config"], "--out", run)
    assert_refused(code, err, run / "samples.png", "No space left on device", "distq evaluate")
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == 30
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    from distq.runs import rundir

    write = rundir.Path.write_bytes

    def second_checkpoint_fails(self, data):
        if self.name == "checkpoint.pt.tmp" and (self.parent / "checkpoint.pt").exists():
            write(self, data[:100])
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(rundir.Path, "write_bytes", second_checkpoint_fails)
    run = tmp_path / "run"
    assert_refused(*run_cli("train", trained["config"], "--out", run)[::2], run / "checkpoint.pt", "is kept")
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == 10
    assert not (run / "checkpoint.pt.tmp").exists()


def test_a_failed_start_writes_nothing_and_its_retry_needs_no_overwrite(trained, tmp_path, monkeypatch):
    import distq.training.trainer

    def no_ray(*args):
        raise DistqError("could not start or join Ray (address 10.0.0.1:6379): unreachable")

    monkeypatch.setattr(distq.training.trainer, "make_backend", no_ray)
    run = tmp_path / "run"
    assert_refused(*run_cli("train", trained["config"], "--out", run)[::2], "could not start or join Ray")
    assert list(run.iterdir()) == []
    monkeypatch.undo()
    (run / "config.yaml").write_text("seed: 3\n")  # as an older distq left it
    code, _, err = run_cli("train", trained["config"], "--out", run)
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == 30
