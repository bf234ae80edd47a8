"""distq.setup.config: defaults and every validation error naming its field (files and overrides: test_configfile.py)."""
import dataclasses
from pathlib import Path

import pytest

from distq.errors import DistqError
from distq.runs.rundir import save_config
from distq.setup.config import Config, config_from_dict, single_process_reason
from distq.setup.configfile import apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent


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


def test_integral_float_accepted_for_int_field():
    assert _from_overrides("train.batch_size=16.0").train.batch_size == 16


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
    (["model.value_prior=exact"], "model.value_prior"),
    (["train.target_rate=-0.1"], "train.target_rate"),
    (["train.target_rate=1.5"], "train.target_rate"),
    (["train.target_rate=.nan"], "train.target_rate"),
    (["train.target_rate=0.01", "train.algorithm=ddpo_sf"], "train.target_rate"),
    (["train.ema_rate=-0.1"], "train.ema_rate"),
    (["train.ema_rate=2"], "train.ema_rate"),
    (["train.ema_rate=.nan"], "train.ema_rate"),
    (["sde.beta_min=2.0", "sde.beta_max=1.0"], "sde.beta_max"),
    (["ratio.eps=-1.0"], "ratio.eps"),
    (["seed=-1"], "seed"),
    (["train.processes=3"], "train.processes"),
    (["data.source=gmm", "data.dim=3", "reward.fn=linear", "reward.coef=[1, 2]"], "reward.coef"),
    (["data.source=gmm", "data.components=0"], "data.components"),
    (["train.device=gpu"], "train.device"),
    (["parallel.rollout_device=cuda:1"], "parallel.rollout_device"),
    (["parallel.memory_per_worker_mb=0"], "parallel.memory_per_worker_mb"),
    (["parallel.learner_memory_mb=-5"], "parallel.learner_memory_mb"),
    (["parallel.memory_per_worker_mb=.inf"], "parallel.memory_per_worker_mb"),
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


@pytest.mark.parametrize("overrides, reason", [
    (["parallel.workers=2"], "with parallel.workers=2 the learner runs in one Ray actor"),
    (["train.algorithm=dsm"], "not train.algorithm=dsm's update"),
    (["train.policy_gradient=rao_blackwell"], "train.policy_gradient=rao_blackwell needs the ratio scores"),
    (["train.target_rate=0.01"], "train.target_rate=0.01 needs a target network"),
    (["train.device=auto"], "train.device=auto and parallel.rollout_device=cpu"),
    (["parallel.rollout_device=cuda"], "train.device=cpu and parallel.rollout_device=cuda"),
])
def test_two_processes_where_they_cannot_split_the_run_are_taken_as_one(overrides, reason):
    """train.processes = 2 is a speed option: a run it cannot serve is valid and runs in one process (the reason is
    the notice distq.training.trainer prints); with processes = 1 there is nothing to say."""
    assert reason in single_process_reason(_from_overrides("train.processes=2", *overrides))
    assert single_process_reason(_from_overrides("train.processes=1", *overrides)) is None
    assert single_process_reason(_from_overrides("train.processes=2")) is None


@pytest.mark.parametrize("overrides", [["parallel.workers=2"], ["train.processes=2"], ["ratio.method=minibatch"],
                                       ["ratio.minibatch=50"], ["ratio.method=knn", "ratio.knn=8"]])
def test_conditional_runs_take_every_backend_and_ratio_method(overrides):
    cfg = _from_overrides("data.condition=label", *overrides)
    assert cfg.data.condition == "label"


@pytest.mark.parametrize("overrides, field", [
    (["reward.fn=[]"], "reward.fn"),
    (["reward.fn=[swiss_roll_rectangle, brightness]", "reward.weights=[1]"], "reward.weights"),
    (["reward.fn=brightness", "reward.weights=[1, 1]"], "reward.weights"),
    (["reward.fn=[swiss_roll_rectangle, brightness]", "reward.weights=[1, -0.5]"], "reward.weights"),
    (["reward.fn=[swiss_roll_rectangle, brightness]", "reward.weights=[1, .inf]"], "reward.weights"),
    (["reward.fn=[swiss_roll_rectangle, brightness]", "reward.weights=[.nan, 1]"], "reward.weights"),
    (["reward.fn=[swiss_roll_rectangle, brightness]", "reward.weights=[0, 0]"], "reward.weights"),
    (["reward.fn=[swiss_roll_rectangle, linear]"], "reward.coef"),
])
def test_bad_reward_lists_name_the_field(overrides, field):
    with pytest.raises(DistqError) as info:
        load_config(ROOT / "configs" / "swiss_roll.yaml", overrides)
    assert f"'{field}'" in str(info.value) and "\n" not in str(info.value)


def test_a_reward_list_round_trips_through_yaml(tmp_path):
    config = load_config(ROOT / "configs" / "swiss_roll.yaml", ["reward.fn=[swiss_roll_rectangle, linear]",
                                                                "reward.coef=[1, 0]", "reward.weights=[1, 0.5]"])
    assert config.reward.fn == ("swiss_roll_rectangle", "linear") and config.reward.weights == (1.0, 0.5)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
