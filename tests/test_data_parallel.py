"""distq.backends.data_parallel: parallel.mode = ddp trains, with W = 1 and 2 Ray Train workers, the in-process run's weights and
metrics (up to float summation order); a ddp checkpoint resumes exactly, in any mode; a bad reward in a worker is
one line."""
import json
import os
import textwrap

import pytest
import torch

ray = pytest.importorskip("ray")

from distq.edges.cli import main  # noqa: E402
from distq.runs import rundir  # noqa: E402
from distq.runs.checkpoint import load_checkpoint  # noqa: E402
from distq.setup.config import config_from_dict  # noqa: E402
from distq.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.ray

B, CHUNK, N = 32, 8, 64
ATOL = 1e-5
"""Weights after a few updates: the replicas sum their gradients in another order than one process does (float32
rounding, ~1e-7 relative per update, amplified by Adam's normalisation where a gradient is near 0)."""
RUN = {"seed": 5, "data": {"source": "swiss_roll", "n_samples": N}, "reward": {"fn": "swiss_roll_rectangle"},
       "sde": {"dt": 0.5}, "eval": {"n_samples": 32, "batches": 2}}
CONDITIONAL = {"data": {"source": "swiss_roll", "n_samples": N, "condition": "label", "classes": 2},
               "reward": {"fn": ["linear", "brightness"], "coef": [1.0, 0.0], "weights": [1.0, 0.5]},
               "ratio": {"minibatch": 16}}


def _config(workers=0, episodes=4, train=None, parallel=None, **run):
    values = {**RUN, **run,
              "train": {"batch_size": B, "chunk_size": CHUNK, "episodes": episodes, "beta": 1.0, "log_every": 1,
                        "checkpoint_every": 2, "progress_seconds": 0, **(train or {})}}
    if workers:
        values["parallel"] = {"workers": workers, "mode": "ddp", "num_cpus_per_worker": 1, **(parallel or {})}
    return config_from_dict(values)


def _trained(config, run_dir, resume=False):
    summary = train(config, run_dir, resume=resume, echo=lambda line: None)
    payload = load_checkpoint(run_dir / rundir.CHECKPOINT)
    return summary, payload, rundir.read_table_rows(run_dir / rundir.METRICS)


def _assert_same_run(ours, reference):
    (summary, payload, rows), (_, ref_payload, ref_rows) = ours, reference
    assert payload["episode"] == ref_payload["episode"] == summary["episodes"]
    for part in ("policy", "value", "target", "policy_average"):
        for name, tensor in ref_payload["learner"].get(part, {}).items():
            assert torch.allclose(payload["learner"][part][name], tensor, atol=ATOL), f"{part}.{name}"
    assert payload["learner"]["updates"] == ref_payload["learner"]["updates"]
    assert [r["episode"] for r in rows] == [r["episode"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        listed = [key for key in ref if key.startswith("reward/terminal_mean/")]
        assert listed == [key for key in row if key.startswith("reward/terminal_mean/")]
        for key in ("loss/td", "reward/terminal_mean", "reward/running_mean", "grad_norm/policy", "grad_norm/value",
                    *listed):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["episode"], key)


def test_bad_reward_in_a_worker_is_a_one_line_error(ray_session, monkeypatch, tmp_path, capsys):
    """NaN in one worker's part only (2 chunks of the B = 32 batch): the other worker stops at the same episode.
    The workers run with glibc's one arena (distq.setup.machine.worker_env), which the reward records."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(f"""
        import os

        def h(x):
            with open({str(tmp_path / "arenas")!r}, "a") as seen:
                seen.write(f"{{os.getpid()}} {{os.environ.get('MALLOC_ARENA_MAX')}}\\n")
            out = x[:, 0].clone()
            if x.shape[0] == {2 * CHUNK}:
                out[0] = float("nan")
            return out
    """))
    values = {**RUN, "reward": {"fn": "my_reward.py:h"},
              "train": {"batch_size": B, "chunk_size": CHUNK, "episodes": 3, "beta": 1.0, "log_every": 1},
              "parallel": {"workers": 2, "mode": "ddp", "num_cpus_per_worker": 1}}
    (tmp_path / "config.yaml").write_text(json.dumps(values))
    assert main(["train", "config.yaml", "--out", "run"]) == 2
    # Ray Train's controller logs reach this stderr only because the test session's Ray forwards worker logs
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if not line.startswith("\x1b[36m("))
    assert err.count("\n") == 1 and err.startswith("distq: error: reward.fn '")
    assert f"returned 1 non-finite values (NaN or inf) in a batch of {2 * CHUNK}" in err
    workers = {line.split()[1] for line in (tmp_path / "arenas").read_text().splitlines()
               if int(line.split()[0]) != os.getpid()}
    assert workers == {"1"}
    assert ray.is_initialized()


GATED_REWARD = """
import os, time
from pathlib import Path

FOLDER = Path({folder!r})
calls = 0


def h(x):
    # once the test has armed the gate, at a W = 2 worker's third call on its part ({part} trajectories): wait until
    # the test has killed a worker; the restarted workers find the gate open
    global calls
    calls += x.shape[0] == {part} and (FOLDER / "armed").exists()
    if calls == 3 and not (FOLDER / "open").exists():
        (FOLDER / f"pid_{{os.getpid()}}").write_text("")
        deadline = time.monotonic() + 300
        while not (FOLDER / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return x[:, 0]
"""


def test_ddp_resumes_survives_a_killed_worker_and_trains_the_in_process_run(ray_session, tmp_path):
    """W = 2, conditional, rao_blackwell with a target network and EMA, a list reward: 2 episodes, then a resume from
    that ddp checkpoint to 6 in which a worker is killed mid-run, at its third reward call on its part after the
    resume (Ray Train restarts the group from the last checkpoint). The end equals the straight in-process run: exactness, resume and fault tolerance at once (each
    Ray Train start-up costs seconds of the suite's budget; W = 1 runs as a Tune trial in tests/test_tuning.py, a
    ddp checkpoint continuing in process in tests/test_trainer.py's signal test)."""
    import os
    import signal
    import threading
    import time

    gate = tmp_path / "gate"
    gate.mkdir()
    (tmp_path / "gated.py").write_text(GATED_REWARD.format(folder=str(gate), part=B // 2))
    setting = {"train": {"policy_gradient": "rao_blackwell", "target_rate": 0.1, "ema_rate": 0.2}, **CONDITIONAL,
               "reward": {**CONDITIONAL["reward"], "fn": [f"{tmp_path / 'gated.py'}:h", "brightness"]}}
    reference = _trained(_config(episodes=6, **setting), tmp_path / "in_process")
    _trained(_config(2, episodes=2, **setting), tmp_path / "ddp")
    (gate / "armed").touch()

    def kill_the_first_at_the_gate():
        deadline = time.monotonic() + 300
        while not list(gate.glob("pid_*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(sorted(gate.glob("pid_*"))[0].name[4:]), signal.SIGKILL)
        (gate / "open").write_text("")

    killer = threading.Thread(target=kill_the_first_at_the_gate, daemon=True)
    killer.start()
    ours = _trained(_config(2, episodes=6, **setting), tmp_path / "ddp", resume=True)
    killer.join()
    _assert_same_run(ours, reference)
    assert ours[0]["worker_restarts"] == 1 and ours[0]["workers"] == 2
    # list rewards: each one's mean over the whole batch (all-reduced), as in process
    assert {f"reward/terminal_mean/{name}" for name in setting["reward"]["fn"]} <= set(ours[2][-1])
    assert {"time/rollout_s", "time/gradient_s", "time/allreduce_s", "time/step_s",
            "parallel/bytes_allreduced"} <= set(ours[2][-1])


def test_ddp_trains_weighted_dsm_as_in_process(ray_session, tmp_path):
    """Weighted dsm (train.algorithm dsm, beta > 0), conditional with a list reward, on W = 2 replicas: each draws its
    chunks' rows by the tilt, the loss and metric sums are all-reduced, and the run ends with the in-process run's
    weights and metrics."""
    setting = {**CONDITIONAL, "train": {"algorithm": "dsm"}}
    (summary, payload, rows), (ref_summary, ref_payload, ref_rows) = (
        _trained(_config(2, episodes=3, **setting), tmp_path / "ddp"),
        _trained(_config(episodes=3, **setting), tmp_path / "in_process"))
    assert summary["workers"] == 2 and payload["episode"] == ref_payload["episode"] == 3
    assert summary["ess"] == pytest.approx(ref_summary["ess"]) and summary["ess"] < N
    for name, tensor in ref_payload["learner"]["policy"].items():
        assert torch.allclose(payload["learner"]["policy"][name], tensor, atol=ATOL), name
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss/dsm", "reward/terminal_mean", "reward/terminal_mean/brightness", "grad_norm/policy"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["episode"], key)
