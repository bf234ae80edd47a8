"""distq.edges.wandb_callback: W&B is offline unless an API key is given; only the tracking modules import wandb."""
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("wandb")
from distq.edges.sweep import TrackingConfig  # noqa: E402
from distq.edges.wandb_callback import TrialWandbCallback, _store_runs, trial_wandb_callback, wandb_mode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_offline_without_an_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"


def test_online_with_an_api_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "online"


def test_the_config_mode_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("disabled") == "disabled"


def test_wandb_mode_wins(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_callback_groups_runs_per_sweep_and_needs_no_key_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    callback = trial_wandb_callback(TrackingConfig(project="p", entity="team"), "sweep-a", {"train.beta": 0.0})
    assert isinstance(callback, TrialWandbCallback)
    assert (callback.project, callback.group) == ("p", "sweep-a")
    assert callback.kwargs == {"mode": "offline", "resume": "allow", "entity": "team"}
    callback.setup()  # Ray's callback would demand an API key here; offline it must not


def test_only_tracking_imports_wandb():
    pattern = re.compile(r"^\s*(import wandb|from wandb|from ray.air.integrations.wandb)", re.MULTILINE)
    importers = sorted(str(p.relative_to(ROOT / "distq")) for p in (ROOT / "distq").rglob("*.py")
                       if pattern.search(p.read_text()))
    assert importers == ["edges/wandb_callback.py", "runs/tracking.py"]
    code = "import sys, distq.edges.cli, distq.training.trainer, distq.edges.tuning, distq.edges.calibrate; print('wandb' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"  # a sweep without tracking never loads it


def test_runs_written_after_tunes_last_upload_reach_the_storage(tmp_path):
    """Tune uploads the driver's staging directory before the callbacks' on_experiment_end, where the logging actors
    finish their runs: what they wrote after that upload (here: a media file, a longer history) is copied then."""
    import pyarrow.fs

    staged, stored = tmp_path / "staging" / "trial", tmp_path / "storage" / "trial"
    run = Path("wandb") / "offline-run-1"
    (staged / run / "files" / "media" / "images").mkdir(parents=True)
    (staged / run / "files" / "media" / "images" / "samples_1.png").write_bytes(b"png")
    (staged / run / "run-1.wandb").write_bytes(b"history, complete")
    (stored / run).mkdir(parents=True)
    (stored / run / "run-1.wandb").write_bytes(b"history")  # Tune's last upload, before the run ended
    trial = types.SimpleNamespace(local_path=str(staged), path=str(stored),
                                  storage=types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()))
    _store_runs(trial)
    assert (stored / run / "run-1.wandb").read_bytes() == b"history, complete"
    assert (stored / run / "files" / "media" / "images" / "samples_1.png").read_bytes() == b"png"
