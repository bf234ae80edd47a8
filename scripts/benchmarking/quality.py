"""Sample quality: paper-scale Swiss roll training runs, their reward and KL."""
from __future__ import annotations

from pathlib import Path

from distq.setup.configfile import load_config


def bench_quality(config_file: str, episodes: int, betas: list[float], overrides: list[str]) -> dict:
    """Paper-scale Swiss roll runs from `config_file` (plus `overrides`) at several beta; summary of each."""
    from distq.training.trainer import train
    results = {}
    suffix = "".join(f"_{o}" for o in [Path(config_file).stem, *overrides]).replace("/", "-")
    for beta in betas:
        config = load_config(config_file, [*overrides, f"train.beta={beta}", f"train.episodes={episodes}",
                                                         "train.progress_seconds=60"])
        summary = train(config, f"runs/bench_quality_beta{beta:g}{suffix}", overwrite=True)
        print(f"beta={beta:g}: {summary}", flush=True)
        results[f"beta={beta:g}"] = {k: summary[k] for k in ("reward_mean", "reward_ci95", "kl_mean", "kl_ci95",
                                                            "kl_floor", "episodes", "episodes_per_s", "wall_s")}
    return {"setting": f"{config_file} {' '.join(overrides)}, {episodes} episodes, eval 20 batches of 300 "
                       "vs fresh data",
            "runs": results}
