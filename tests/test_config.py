"""distq.config: defaults, YAML round trip, dotted overrides, and every validation error naming its field."""
import dataclasses

import pytest

from distq.config import Config, apply_overrides, config_from_dict, load_config, save_config
from distq.errors import DistqError


def _from_overrides(*overrides):
    return config_from_dict(apply_overrides({}, list(overrides)))


def _error(*overrides) -> str:
    with pytest.raises(DistqError) as info:
        _from_overrides(*overrides)
    return str(info.value)


def _error_from_dict(values) -> str:
    with pytest.raises(DistqError) as info:
        config_from_dict(values)
    return str(info.value)


def test_defaults_are_valid_and_match_the_paper_table():
    cfg = Config()
    assert config_from_dict({}) == cfg
    # algorithm.md section 7, paper Table 2: T = 5, dt = 0.25 (K = 20), batch 300, lr 1e-3, temperature 5.
    assert (cfg.sde.T, cfg.sde.dt, cfg.sde.num_steps) == (5.0, 0.25, 20)
    train = cfg.train
    assert (train.batch_size, train.lr_policy, train.lr_value, train.temperature) == (300, 1e-3, 1e-3, 5.0)
    assert cfg.sde.schedule == "ou" and cfg.train.beta == 0.0 and cfg.seed == 0


def test_to_dict_is_plain_yaml_layout():
    values = Config().to_dict()
    assert set(values) == {f.name for f in dataclasses.fields(Config)}
    assert {"seed", "data", "reward", "sde", "ratio", "model", "train", "eval"} <= set(values)
    assert values["data"]["mean"] == [0.0, 0.0] and isinstance(values["data"]["mean"], list)


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


def test_integral_float_accepted_for_int_field():
    assert _from_overrides("train.batch_size=16.0").train.batch_size == 16


def test_exponent_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr_policy: 1e-3\n")  # the default, written as the README's table writes it
    assert load_config(path).train.lr_policy == pytest.approx(1e-3)
    cfg = _from_overrides("train.lr_policy=3e-4", "ratio.eps=1e-8", "train.episodes=1e4")
    assert cfg.train.lr_policy == pytest.approx(3e-4) and cfg.ratio.eps == pytest.approx(1e-8)
    assert cfg.train.episodes == 10000


def test_override_syntax_errors():
    assert "section.key=value" in _error("train.beta")
    assert "'train.beta'" in _error("train.beta.x=1")
    with pytest.raises(DistqError, match="'beta' is not a config section"):
        apply_overrides({"train": {"beta": 1.0}}, ["train.beta.x=1"])


def test_unknown_top_level_key_suggests():
    message = _error("trian.beta=1")
    assert "'trian'" in message and "did you mean 'train'" in message
    message = _error("sed=3")
    assert "'sed'" in message and "did you mean 'seed'" in message


def test_unknown_section_key_suggests_dotted_path():
    message = _error("train.lr_polcy=0.1")
    assert "'train.lr_polcy'" in message and "did you mean 'train.lr_policy'" in message
    message = _error_from_dict({"sde": {"schedul": "ve"}})
    assert "'sde.schedule'" in message


def test_section_must_be_mapping():
    assert "'train'" in _error_from_dict({"train": 3})


@pytest.mark.parametrize("override, field", [
    ("train.temperature=abc", "train.temperature"),
    ("sde.T=[1, 2]", "sde.T"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.episodes=true", "train.episodes"),
    ("sde.schedule=3", "sde.schedule"),
    ("data.mean=[1, x]", "data.mean[1]"),
    ("seed=abc", "seed"),
])
def test_wrong_type_names_field(override, field):
    assert f"'{field}'" in _error(override)


@pytest.mark.parametrize("overrides, field", [
    (["sde.dt=0.3"], "sde.dt"),
    (["sde.T=1.0", "sde.dt=0.15"], "sde.dt"),
    (["sde.dt=6.0"], "sde.dt"),
    (["train.temperature=0"], "train.temperature"),
    (["train.temperature=-1.0"], "train.temperature"),
    (["train.temperature=.nan"], "train.temperature"),
    (["train.beta=-0.1"], "train.beta"),
    (["train.batch_size=1"], "train.batch_size"),
    (["eval.k=299"], "eval.k"),
    (["eval.n_samples=10", "eval.k=9"], "eval.k"),
    (["eval.k=0"], "eval.k"),
    (["data.source=file"], "data.path"),
    (["reward.fn=linear"], "reward.coef"),
    (["data.source=gaussian", "data.mean=[0, 0, 0]", "reward.fn=linear", "reward.coef=[1, 2]"], "reward.coef"),
    (["sde.schedule=xx"], "sde.schedule"),
    (["sde.sampler=heun"], "sde.sampler"),
    (["model.precondition=fancy"], "model.precondition"),
    (["train.policy_gradient=exact"], "train.policy_gradient"),
    (["model.time_frequencies=-1"], "model.time_frequencies"),
    (["train.policy_gradient=rao_blackwell", "train.algorithm=dsm"], "train.policy_gradient"),
    (["train.policy_gradient=rao_blackwell", "train.processes=2"], "train.policy_gradient"),
    (["model.value_prior=exact"], "model.value_prior"),
    (["train.target_rate=-0.1"], "train.target_rate"),
    (["train.target_rate=1.5"], "train.target_rate"),
    (["train.target_rate=.nan"], "train.target_rate"),
    (["train.target_rate=0.01", "train.processes=2"], "train.target_rate"),
    (["train.target_rate=0.01", "train.algorithm=ddpo_sf"], "train.target_rate"),
    (["sde.beta_min=2.0", "sde.beta_max=1.0"], "sde.beta_max"),
    (["ratio.eps=-1.0"], "ratio.eps"),
    (["seed=-1"], "seed"),
    (["train.processes=3"], "train.processes"),
    (["data.source=gmm", "data.dim=3", "reward.fn=linear", "reward.coef=[1, 2]"], "reward.coef"),
    (["data.source=gmm", "data.components=0"], "data.components"),
    (["train.processes=2", "parallel.workers=1"], "train.processes"),
    (["train.device=gpu"], "train.device"),
    (["parallel.rollout_device=cuda:1"], "parallel.rollout_device"),
    (["parallel.memory_per_worker_mb=0"], "parallel.memory_per_worker_mb"),
    (["parallel.learner_memory_mb=-5"], "parallel.learner_memory_mb"),
    (["parallel.memory_per_worker_mb=.inf"], "parallel.memory_per_worker_mb"),
    (["train.processes=2", "train.device=auto"], "train.processes"),
    (["train.processes=2", "parallel.rollout_device=cuda"], "train.processes"),
    (["parallel.workers=1", "train.device=cuda"], "train.device"),
    (["parallel.workers=1", "parallel.rollout_device=cuda"], "parallel.rollout_device"),
])
def test_out_of_range_names_field(overrides, field):
    assert f"'{field}'" in _error(*overrides)


def test_range_boundaries_accepted():
    cfg = _from_overrides("sde.T=1.0", "sde.dt=0.1", "train.batch_size=2", "train.beta=0", "eval.n_samples=10",
                          "eval.k=8", "data.source=file", "data.path=x.csv", "reward.fn=linear", "reward.coef=[1.0]")
    assert cfg.sde.num_steps == 10 and cfg.eval.k == 8


def test_devices_and_memory_parse_where_they_cannot_run():
    """Configs are written on laptops for GPU clusters: cuda is checked when a run starts (test_devices), not here."""
    cfg = _from_overrides("train.device=cuda", "parallel.rollout_device=auto", "parallel.workers=2",
                          "parallel.learner_num_gpus=1", "parallel.memory_per_worker_mb=1e6",
                          "parallel.learner_memory_mb=512")
    assert (cfg.train.device, cfg.parallel.rollout_device) == ("cuda", "auto")
    assert (cfg.parallel.memory_per_worker_mb, cfg.parallel.learner_memory_mb) == (1e6, 512.0)
    defaults = Config()
    assert defaults.train.device == defaults.parallel.rollout_device == "cpu"
    assert defaults.parallel.memory_per_worker_mb is None and defaults.parallel.learner_memory_mb is None


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.beta = 1.0


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


@pytest.mark.parametrize("overrides", [["parallel.workers=2"], ["train.processes=2"], ["ratio.method=minibatch"],
                                       ["ratio.minibatch=50"], ["ratio.method=knn", "ratio.knn=8"]])
def test_conditional_runs_take_every_backend_and_ratio_method(overrides):
    cfg = _from_overrides("data.condition=label", *overrides)
    assert cfg.data.condition == "label"
