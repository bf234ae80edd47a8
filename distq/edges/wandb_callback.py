"""Weights & Biases tracking of sweeps, through Ray's W&B integration (a single `distq train`: distq.runs.tracking).

One W&B run per Tune trial (run id = trial id), one group per sweep. Ray's WandbLoggerCallback logs from the Tune
driver, so every run's files land in the experiment directory whatever node the trial ran on (copied there once every
run has finished): the trial's config, the metrics of every report, the evaluation's sample plot (samples.png of each
checkpoint that has one: the last report's) and, as the run's summary, the final report.

Offline unless WANDB_API_KEY is set (or WANDB_MODE says otherwise): nothing reaches the network, and each trial
gets TRIAL_DIR/wandb/offline-run-*; upload them later with `wandb sync TRIAL_DIR/wandb/offline-run-*`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.air.integrations.wandb import WandbLoggerCallback

from distq.runs.rundir import PLOT
from distq.runs.tracking import wandb_mode
from distq.setup.config import TrackingConfig


def _samples_image(trial, result: dict[str, Any]):
    """samples.png of the checkpoint reported with `result` as a wandb.Image of the file, if it is on this machine.

    A trial persists its checkpoint before its report reaches the driver, so the file is in place here. The image is
    the checkpoint's own file, which the trial's logging actor (on this node) copies into the W&B run: no temporary
    copy of it has to outlive the report.
    """
    name = result.get("checkpoint_dir_name")
    if not name or not isinstance(trial.storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    path = Path(trial.path) / name / PLOT
    if not path.is_file():
        return None
    import wandb

    return wandb.Image(str(path.resolve()))


def _store_runs(trial) -> None:
    """Copy the trial's W&B files, which its logging actor writes in the driver's staging directory of the trial,
    to the experiment's storage. Tune's last upload of that directory runs before the callbacks' on_experiment_end,
    so without this the runs' last reports (the final samples image, the end of the history) never reach it."""
    staged = Path(trial.local_path) / "wandb"
    if staged.is_dir():
        pyarrow.fs.copy_files(str(staged), f"{trial.path}/wandb", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=trial.storage.storage_filesystem)


class TrialWandbCallback(WandbLoggerCallback):
    """WandbLoggerCallback that needs no API key offline, records the whole training config (`base`, the flat
    config every trial shares, updated by the trial's searched values) and logs each report's sample plot."""

    def __init__(self, base: dict[str, Any], **kwargs):
        super().__init__(**kwargs)
        self.base = base

    def setup(self, *args, **kwargs) -> None:
        if self.kwargs.get("mode") in ("offline", "disabled"):
            return
        super().setup(*args, **kwargs)

    def __del__(self) -> None:
        try:
            super().__del__()
        except AttributeError:  # at interpreter exit Ray's module globals may already be gone
            pass

    def on_experiment_end(self, trials: list, **info) -> None:
        super().on_experiment_end(trials, **info)  # waits for every trial's run to finish writing
        for trial in trials:
            _store_runs(trial)

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        # Tune's result carries the trial's config: W&B's run config is updated from it at every report.
        result = {**result, "config": {**self.base, **result.get("config", {})}}
        image = _samples_image(trial, result)
        if image is not None:
            result["samples"] = image
        super().log_trial_result(iteration, trial, result)


def trial_wandb_callback(tracking: TrackingConfig, group: str, base: dict[str, Any]) -> TrialWandbCallback:
    """The sweep's W&B callback; `resume='allow'` lets a resumed trial continue its own run."""
    extra = {"entity": tracking.entity} if tracking.entity else {}
    return TrialWandbCallback(base, project=tracking.project, group=group, mode=wandb_mode(tracking.mode),
                              resume="allow", **extra)
