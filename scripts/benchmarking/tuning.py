"""Sweep efficiency: the trials of a small sweep as plain `distq train` runs side by side against the sweep itself,
each a command in its own process, alternated in rounds; optionally for other checkouts of distq (before/after)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
BETAS = (0.0, 2.0)
REPORT_EVERY = 250
# distq's command line in a checkout from before (distq.cli) or after (distq.edges.cli) the subpackages
CLI = ("import sys\ntry:\n    from distq.edges.cli import main\nexcept ImportError:\n    from distq.cli import main\n"
       "sys.exit(main())")


def _overrides(episodes: int) -> dict[str, object]:
    """What both ways train: the paper's Swiss roll in one process per run, no tracking."""
    return {"train.episodes": episodes, "train.processes": 1, "tracking.wandb": False}


def _sweep_file(folder: Path, episodes: int) -> Path:
    overrides = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in _overrides(episodes).items())
    path = folder / "sweep.yaml"
    path.write_text(f"name: bench\nbase: {ROOT / 'configs' / 'swiss_roll.yaml'}\noverrides:\n{overrides}\n"
                    f"search_space:\n  train.beta: {{grid: {list(BETAS)}}}\n"
                    f"search: {{algorithm: grid, metric: kl_mean, mode: min}}\nreport_every: {REPORT_EVERY}\n"
                    f"resources: {{cpu: 1}}\nstorage: {folder / 'tune'}\ntracking: {{wandb: false}}\n")
    return path


def _run(commands: list[list[str]], repo: Path) -> float:
    """Wall seconds for the commands run at once (each `distq` with `repo`'s package first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "offline"}
    began = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CLI, *command], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for command in commands]
    for proc, command in zip(procs, commands):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{command} exited {proc.returncode}: {err[-2000:]}")
    return time.perf_counter() - began


def bench_tune(rounds: int, episodes: Optional[int], repos: Sequence[Path] = (ROOT,)) -> dict:
    """Per checkout in `repos`: the wall time of the sweep (`distq tune`, BETAS as a grid, report_every
    REPORT_EVERY, a trial per core) and of the same trials as plain `distq train` runs side by side on the same
    cores; efficiency = plain / sweep, medians over the rounds."""
    episodes = episodes or 2000
    walls: dict[str, dict[str, list[float]]] = {str(repo): {"sweep": [], "plain": []} for repo in repos}
    for _ in range(rounds):
        for repo in repos:
            with tempfile.TemporaryDirectory() as folder:
                folder = Path(folder)
                sets = [arg for key, value in _overrides(episodes).items() for arg in ("--set", f"{key}={value}")]
                plain = [["train", str(ROOT / "configs" / "swiss_roll.yaml"), "--out", str(folder / f"beta{beta:g}"),
                          *sets, "--set", f"train.beta={beta}"] for beta in BETAS]
                walls[str(repo)]["plain"].append(_run(plain, repo))
                walls[str(repo)]["sweep"].append(_run([["tune", str(_sweep_file(folder, episodes))]], repo))
            print(f"{repo}: plain {walls[str(repo)]['plain'][-1]:.1f} s, sweep {walls[str(repo)]['sweep'][-1]:.1f} s",
                  flush=True)
    result = {}
    for repo, times in walls.items():
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "distq"], capture_output=True,
                               text=True).stdout.strip()
        plain, sweep = statistics.median(times["plain"]), statistics.median(times["sweep"])
        result[repo] = {"commit": commit + ("+changes" if dirty else ""), "plain_s_rounds": times["plain"],
                        "sweep_s_rounds": times["sweep"], "plain_s_median": plain, "sweep_s_median": sweep,
                        "efficiency": plain / sweep}
    return {"setting": f"configs/swiss_roll.yaml, {len(BETAS)} trials (beta {', '.join(map(str, BETAS))}) of "
                       f"{episodes} episodes, report_every {REPORT_EVERY}, one process per run",
            "checkouts": result}
