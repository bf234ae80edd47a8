"""Weights & Biases tracking of one `distq train` run (sweeps: distq.edges.wandb_callback, one run per Tune trial).

One W&B run per `distq train`: the whole config, every metrics row at its episode, the evaluation's plots and the
summary. Offline unless WANDB_API_KEY is set (or tracking.mode / WANDB_MODE says otherwise): nothing reaches the
network, and the run lands in RUN_DIR/wandb/offline-run-*; upload it later with `wandb sync`. wandb is imported
only when a run is tracked, so the core runs without it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from distq.errors import DistqError
from distq.setup.config import Config
from distq.setup.schema import flatten


def wandb_mode(mode: Optional[str] = None) -> str:
    """`mode` if given, else WANDB_MODE if set; else online with WANDB_API_KEY, offline without."""
    return mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class RunTracker:
    """The W&B run of one training run in `run_dir`: rows go in as they are written, plots and summary at the end."""

    def __init__(self, config: Config, run_dir: Path, mode: str):
        try:
            import wandb
        except ImportError as err:
            raise DistqError(f"tracking.wandb: W&B cannot be imported ({err}); install wandb or set "
                             "tracking.wandb=false") from None
        tracking = config.tracking
        try:
            self.run = wandb.init(project=tracking.project, group=tracking.group, entity=tracking.entity, mode=mode,
                                  dir=str(run_dir), name=run_dir.name, job_type="train", config=config.to_dict(),
                                  settings=wandb.Settings(silent=True, console="off"))
        except Exception as err:  # wandb raises many types (UsageError, CommError, ...) for a run it cannot start
            raise DistqError(f"tracking: W&B could not start a run ({type(err).__name__}: {err}); set "
                             "tracking.wandb=false or tracking.mode=offline") from None
        self.wandb, self.mode = wandb, mode

    @property
    def directory(self) -> str:
        """Where the run's files are (RUN_DIR/wandb/offline-run-* offline)."""
        return str(Path(self.run.dir).parent)

    def row(self, row: dict[str, Any]) -> None:
        """One metrics row, at its episode."""
        self.run.log({k: v for k, v in row.items() if k != "episode" and _number(v)}, step=int(row["episode"]))

    def finish(self, summary: dict[str, Any], plots: list[Path]) -> None:
        """The evaluation's plots and the summary's numbers (nested ones under dotted keys)."""
        self.run.log({path.stem: self.wandb.Image(str(path)) for path in plots if path.is_file()})
        self.run.summary.update({k: v for k, v in flatten(summary).items() if _number(v) or isinstance(v, str)})

    def close(self, failed: bool) -> None:
        """Finish the run and, unless another run is open in this process, wait for W&B's service to write it out:
        run.finish() returns before the service has flushed the run's .wandb file, which `wandb sync` (or a reader
        in the same process) would then find cut short."""
        self.run.finish(exit_code=1 if failed else 0)
        if self.wandb.run is None:
            self.wandb.teardown()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
