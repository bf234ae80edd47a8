"""distq.setup.configfile: YAML round trips, dotted `--set` overrides applied after the file, errors naming the file."""
import pytest

from distq.errors import DistqError
from distq.runs.rundir import save_config
from distq.setup.config import Config, config_from_dict
from distq.setup.configfile import apply_overrides, load_config


def _from_overrides(*overrides):
    return config_from_dict(apply_overrides({}, list(overrides)))


def test_yaml_round_trip_default(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    assert load_config(path) == Config()


def test_yaml_round_trip_non_default(tmp_path):
    cfg = _from_overrides("seed=7", "data.source=gaussian", "data.mean=[1.5, -2.0, 0.25]", "data.std=0.5",
                          "reward.fn=linear", "reward.coef=[1.0, 0.0, -1.0]", "sde.schedule=vp", "sde.T=1.0",
                          "sde.dt=0.1", "sde.sampler=ddim", "ratio.eps=1.0e-10", "ratio.minibatch=32",
                          "model.precondition=none", "model.hidden=16", "train.grad_clip=2.5",
                          "train.lr_schedule=cosine", "data.columns=[a, b, c]")
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.data.mean == (1.5, -2.0, 0.25) and loaded.reward.coef == (1.0, 0.0, -1.0)
    assert loaded.data.columns == ("a", "b", "c") and loaded.ratio.eps == 1e-10 and loaded.sde.num_steps == 10


def test_load_config_applies_overrides_after_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  beta: 2.0\n  batch_size: 10\nseed: 3\n")
    cfg = load_config(path, ["train.beta=0.5", "seed=11"])
    assert cfg.train.beta == 0.5 and cfg.train.batch_size == 10 and cfg.seed == 11


def test_overrides_with_dotted_paths_lists_and_seed():
    cfg = _from_overrides("seed=42", "train.beta=3", "data.mean=[1, 2, 3]", "sde.sampler=ode_euler",
                          "ratio.minibatch=null", "train.grad_clip=1.5")
    assert cfg.seed == 42
    assert cfg.train.beta == 3.0 and isinstance(cfg.train.beta, float)
    assert cfg.data.mean == (1.0, 2.0, 3.0) and all(isinstance(v, float) for v in cfg.data.mean)
    assert cfg.sde.sampler == "ode_euler" and cfg.ratio.minibatch is None and cfg.train.grad_clip == 1.5


def test_override_scalar_into_tuple_field():
    assert _from_overrides("data.mean=2.5").data.mean == (2.5,)


def test_overrides_do_not_mutate_input():
    values = {"train": {"beta": 1.0}}
    out = apply_overrides(values, ["train.beta=2.0", "seed=1"])
    assert values == {"train": {"beta": 1.0}} and out["train"]["beta"] == 2.0 and out["seed"] == 1


def test_exponent_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr_policy: 1e-3\n")  # the default, written as the README's table writes it
    assert load_config(path).train.lr_policy == pytest.approx(1e-3)
    cfg = _from_overrides("train.lr_policy=3e-4", "ratio.eps=1e-8", "train.episodes=1e4")
    assert cfg.train.lr_policy == pytest.approx(3e-4) and cfg.ratio.eps == pytest.approx(1e-8)
    assert cfg.train.episodes == 10000


def test_override_syntax_errors():
    with pytest.raises(DistqError, match="section.key=value"):
        apply_overrides({}, ["train.beta"])
    with pytest.raises(DistqError, match="'train.beta'"):
        _from_overrides("train.beta.x=1")
    with pytest.raises(DistqError, match="'beta' is not a config section"):
        apply_overrides({"train": {"beta": 1.0}}, ["train.beta.x=1"])


def test_missing_file_and_bad_yaml_are_distq_errors(tmp_path):
    with pytest.raises(DistqError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(DistqError, match="bad.yaml"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(DistqError, match="mapping"):
        load_config(listed)


def test_every_shipped_config_is_valid():
    """configs/*.yaml as the docs run them: the fine-tuning ones with the --init the docs give, the conditional one
    beside the my_rewards.py its reward names (only its import is checked when training starts, not here)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    configs = sorted((root / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        config = load_config(path, ["train.init=runs/pretrained"] if "dpok" in path.name else [])
        assert config.train.episodes > 0, path.name
    gpu = load_config(root / "configs" / "swiss_roll_gpu.yaml")
    assert gpu.train.device == "cuda" and gpu.parallel.workers == 8 and gpu.parallel.learner_num_gpus == 1


def test_swiss_roll_fine_is_the_paper_run_with_the_three_changes_its_results_name():
    """docs/results.md's `bench.py quality --config configs/swiss_roll_fine.yaml` figures were first measured as the
    paper's config with three overrides: the two commands must train the same run."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    episodes = "train.episodes=30000"
    fine = load_config(configs / "swiss_roll_fine.yaml", [episodes])
    paper = load_config(configs / "swiss_roll.yaml", ["sde.grid_power=2", "ratio.bandwidth=0.5", "model.hidden=128",
                                                      episodes])
    assert fine == paper


@pytest.mark.parametrize("name, flags", [
    ("swiss_roll_k40.yaml", ["sde.dt=0.125", "train.episodes=20000"]),
    ("swiss_roll_time_embedding.yaml", ["model.time_frequencies=16", "train.episodes=30000"]),
    ("swiss_roll_target.yaml", ["train.episodes=20000", "train.beta=2", "train.processes=1",
                                "train.policy_gradient=rao_blackwell", "train.target_rate=0.01"]),
    ("swiss_roll_ddim5.yaml", ["sde.sampler=ddim", "sde.dt=1.0", "sde.grid_power=1.5", "train.episodes=20000"]),
    ("swiss_roll_rao_blackwell.yaml", ["train.processes=1", "train.policy_gradient=rao_blackwell"]),
])
def test_an_ablation_config_is_the_fine_run_with_the_flags_its_figures_were_measured_with(name, flags):
    """docs/results.md's ablations were measured as configs/swiss_roll_fine.yaml with these --set flags; their
    configs must train the same runs."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / name) == load_config(configs / "swiss_roll_fine.yaml", flags)
