"""scripts/reproduce.py on a tiny grid (slow): it writes the figures' and tables' markdown with the paper's numbers
beside distq's, says how short the runs were, copies the plots, and a second call trains nothing again."""
import importlib.util
import json
from pathlib import Path

import pytest

from distq.setup.configfile import load_config

pytestmark = [pytest.mark.slow, pytest.mark.plots]

ROOT = Path(__file__).resolve().parent.parent


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_writes_tables_and_resumes(tmp_path, capsys):
    reproduce = _reproduce()
    # a smaller sweep: the suite's time
    reproduce.FINETUNE_BETAS = {"qlearning": (1.0, 2.0), "dpok": (4.0,), "dsm": (2.0,)}
    # one process per run: the configs' second (critic) process gives the same numbers (tests/test_two_process.py)
    argv = ["--episodes", "10", "--eval-batches", "2", "--finetune-episodes", "3", "--out", str(tmp_path),
            "--set", "train.processes=1"]
    reproduce.main(argv)
    figure1, tables = (tmp_path / "figure1.md").read_text(), (tmp_path / "tables5_6.md").read_text()
    assert "QUICK: 10 episodes per run" in figure1 and "| 1 |" in figure1 and "0.982" in figure1
    assert "logical CPUs" in figure1  # the hardware the numbers come from
    assert "(0.14)" in tables and "(1.29)" in tables and "runs/swiss_roll_beta2.25" in tables
    assert (tmp_path / "figure3.md").read_text().count("\n| ") == 5
    assert all((tmp_path / f"figure3_beta{b}.png").is_file() for b in ("0", "1", "2.25", "4"))
    tables34 = (tmp_path / "tables3_4.md").read_text()
    assert "## Table 3: model A" in tables34 and "## Table 4: model B" in tables34 and "(0.39)" in tables34
    assert "3 episodes" in tables34 and "| ddpo_sf (paper: reward 1.0, KL 2.97) | any |" in tables34
    # per model: the pretrained row and one row per fine-tuning run (ddpo_sf for model A only)
    runs = 1 + sum(len(b) for b in reproduce.FINETUNE_BETAS.values())
    assert tables34.count("| qlearning | ") == 2 * (1 + len(reproduce.FINETUNE_BETAS["qlearning"]))
    # every method also sampled at FINER_SAMPLING_STEPS: one more KL-at-reward row per model, two more columns per run
    assert tables34.count("| dpok, sampled at 40 steps | ") == 2 and "| KL, 40 steps |" in tables34
    # weighted dsm: a sweep row per model, and KL-at-reward rows with no paper number beside them
    assert tables34.count("| weighted dsm | 2 | ") == 2 and tables34.count("| weighted dsm | ") == 4
    assert "| weighted dsm, sampled at 40 steps | " in tables34
    assert load_config(tmp_path / "runs" / "table_A_dsm_beta2" / "config.yaml").train.processes == 1  # --set
    assert "ess" in json.loads((tmp_path / "runs" / "table_A_dsm_beta2" / "summary.json").read_text())
    assert sum(line.count(" | ") == 5 for line in tables34.splitlines()
               if line.startswith("| qlearning | ")) == 2 * len(reproduce.FINETUNE_BETAS["qlearning"])
    # the grid ablation: each sampler on each grid power, learned beside the perfect learner
    ablation = tables[tables.index("## Ablation: time grids"):tables.index("## Ablation: a learned time embedding")]
    assert ablation.count("\n| ddim | ") == len(reproduce.GRID_POWERS) and "| sde | 1.5 | " in ablation
    assert ablation.count("\n| heun | ") == ablation.count("\n| dpmpp_2m | ") == len(reproduce.GRID_POWERS)
    assert " / - |" not in ablation  # every sampler beside its perfect learner
    # the time-embedding ablation: ddim, heun and dpmpp_2m on its grid powers, each cell without / with the embedding
    embedding = tables[tables.index("## Ablation: a learned time embedding"):]
    assert "runs/model_A_time16" in embedding and embedding.count(" | 2 | ") == 1 + len(reproduce.SECOND_ORDER)
    assert (embedding.count("\n| ddim | ") == embedding.count("\n| heun | ") == embedding.count("\n| dpmpp_2m | ")
            == len(reproduce.EMBEDDING_GRID_POWERS))
    assert (tmp_path / "runs" / "model_A_time16" / "checkpoint.pt").is_file()
    assert "runs/model_A_time16" in tables34 and "`model.time_frequencies: 16`" in tables34
    capsys.readouterr()
    reproduce.main(argv)
    # + ddpo_sf's run, + model A once more for each ablation, + the embedding's model
    assert capsys.readouterr().out.count("finished earlier, kept") == 7 + 2 * runs + 4


def test_kl_at_reward_interpolates_between_bracketing_runs():
    reproduce = _reproduce()
    points = [(0.6, 0.2), (0.75, 0.3), (0.85, 0.6)]
    assert abs(reproduce.kl_at_reward(points, 0.8) - 0.45) < 1e-12
    assert abs(reproduce.kl_at_reward(points, 0.7) - (0.2 + 0.1 * 2 / 3)) < 1e-12
    assert reproduce.kl_at_reward(points, 0.9) is None and reproduce.kl_at_reward(points, 0.5) is None
    # noise can make the reward dip between betas: a bracketing pair is still used, in either order
    assert abs(reproduce.kl_at_reward([(0.8, 0.4), (0.7, 0.2)], 0.75) - 0.3) < 1e-12


def test_right_mode_mass_is_the_closed_form_tilt():
    reproduce = _reproduce()
    assert reproduce.right_mode_mass(0.0) == 0.5
    assert abs(reproduce.right_mode_mass(0.1) - 0.599) < 1e-3 and abs(reproduce.right_mode_mass(1.0) - 0.982) < 1e-3


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, capsys):
    """A run with a checkpoint but no summary (stopped mid-training) resumes: its metrics keep the first episodes'
    rows and its weights equal a straight run's; an incompatible checkpoint is trained afresh."""
    import torch

    from distq.runs.checkpoint import load_checkpoint

    reproduce = _reproduce()
    args = reproduce.parse_args(["--episodes", "20", "--eval-batches", "2", "--out", str(tmp_path)])
    overrides = ["train.log_every=5", "train.checkpoint_every=10"]
    straight = reproduce.trained("straight", "configs/gmm1d.yaml", overrides, args)[1]
    reproduce.trained("stopped", "configs/gmm1d.yaml", overrides, args, episodes=10)
    (tmp_path / "runs" / "stopped" / "summary.json").unlink()  # as if stopped after the checkpoint at episode 10
    rows_before = (tmp_path / "runs" / "stopped" / "metrics.parquet").read_bytes()
    capsys.readouterr()
    _, stopped, summary = reproduce.trained("stopped", "configs/gmm1d.yaml", overrides, args)
    assert "stopped: continuing from episode 10 to 20" in capsys.readouterr().out and summary["episodes"] == 20
    ours, theirs = (load_checkpoint(run / "checkpoint.pt")["learner"]["policy"] for run in (stopped, straight))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    assert rows_before != (stopped / "metrics.parquet").read_bytes()

    (stopped / "summary.json").unlink()
    reproduce.trained("stopped", "configs/gmm1d.yaml", [*overrides, "train.beta=1"], args)
    assert "cannot continue" in capsys.readouterr().out
    assert load_checkpoint(stopped / "checkpoint.pt")["config"]["train"]["beta"] == 1.0


def test_a_finished_run_is_kept_only_with_the_same_config(tmp_path, capsys):
    """A finished run of another config (an older reproduce.py's, say) is not quoted: it is trained again."""
    reproduce = _reproduce()
    args = reproduce.parse_args(["--episodes", "5", "--eval-batches", "2", "--out", str(tmp_path)])
    reproduce.trained("run", "configs/gmm1d.yaml", [], args)
    capsys.readouterr()
    reproduce.trained("run", "configs/gmm1d.yaml", [], args)
    assert "run: finished earlier, kept" in capsys.readouterr().out
    _, run_dir, _ = reproduce.trained("run", "configs/gmm1d.yaml", ["train.beta=1"], args)
    out = capsys.readouterr().out
    assert "run: finished earlier with another config" in out and "finished earlier, kept" not in out
    assert load_config(run_dir / "config.yaml").train.beta == 1.0
