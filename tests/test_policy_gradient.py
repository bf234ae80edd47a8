"""distq.algorithms.policy_gradient: DPOK's KL against the closed form (torch's Gaussian KL), ddpo_is's first step equal to ddpo_sf's,
each baseline raising the reward from a pretrained run (--init), and the init's errors."""
import pytest
import torch

from distq.algorithms.batch import episode_chunks
from distq.algorithms.policy_gradient import clipped_surrogate, normalised_advantages, policy_kl
from distq.backends.build import build_learner, build_rollout
from distq.errors import DistqError
from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.runs.checkpoint import load_checkpoint
from distq.setup.config import config_from_dict
from distq.training.trainer import train


def _config(algorithm="qlearning", beta=0.0, episodes=200, init=None, **train_extra):
    return config_from_dict({
        "seed": 1,
        "data": {"source": "gaussian", "mean": [1.0, -1.0], "std": 1.0, "n_samples": 300},
        "reward": {"fn": "linear", "coef": [1.0, 0.0]},
        "sde": {"T": 5.0, "dt": 0.5},
        "model": {"hidden": 16},
        "train": {"algorithm": algorithm, "init": init, "beta": beta, "episodes": episodes, "batch_size": 64,
                  "chunk_size": 64, "lr_policy": 3e-3, "lr_value": 3e-3, "log_every": 50,
                  "checkpoint_every": 10_000, **train_extra},
        "eval": {"n_samples": 100, "batches": 2},
    })


def _quiet(_: str) -> None:
    """Training progress goes nowhere."""


def test_policy_kl_is_the_gaussian_closed_form():
    gen = torch.Generator().manual_seed(0)
    mean, reference = torch.randn(7, 2, generator=gen), torch.randn(7, 2, generator=gen)
    g2, theta = torch.tensor(1.7), 0.6
    std = (theta / g2).sqrt()
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(reference, std)).sum(-1)
    assert torch.allclose(policy_kl(mean, reference, g2, theta), expected, rtol=1e-5)


def test_clipped_surrogate_clips_only_beyond_the_range():
    advantages = torch.tensor([1.0, -1.0])
    log_ratio = torch.log(torch.tensor([[1.5, 1.5], [0.5, 0.5]]))
    assert torch.allclose(clipped_surrogate(log_ratio, advantages, 0.2), torch.tensor([[1.2, -1.5], [0.5, -0.8]]))
    rewards = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(normalised_advantages(rewards), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


def test_ddpo_is_first_step_is_ddpo_sf():
    """At ratio 1 the clipped importance-sampling gradient is the score-function gradient: same update."""
    weights = {}
    for algorithm in ("ddpo_sf", "ddpo_is"):
        config = _config(algorithm, beta=1.0)
        dataset = load_dataset(config.data, config.seed)
        reward = load_reward(config.reward, dataset.points[:8])
        learner = build_learner(config, dataset.points, reward)
        with torch.no_grad():  # a policy whose mean depends on its weights
            learner.policy.net[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        rollout = build_rollout(config, dataset.points, reward, policy=learner.policy)
        learner.update(rollout.run(episode_chunks(config.seed, 1, 64, 64)))
        weights[algorithm] = learner.policy_weights()
    for key, tensor in weights["ddpo_sf"].items():
        assert torch.allclose(tensor, weights["ddpo_is"][key], rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("algorithm", ["dpok", "ct_finetune"])
def test_pretrained_algorithms_need_an_init_run(algorithm):
    with pytest.raises(DistqError, match="'train.init'"):
        _config(algorithm)


def test_ct_finetune_running_reward_uses_the_pretrained_mean():
    """Scores as Actions: r_hat_k = -(g^2 / 2) |mu_ref(tau_k, Y_k) - a_k|^2 with the reference's own forward pass."""
    config = _config("ct_finetune", beta=1.0, init="unused")
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    learner = build_learner(config, dataset.points, reward)
    with torch.no_grad():
        learner.reference.net[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    rollout = build_rollout(config, dataset.points, reward)
    rollout.set_weights(learner.policy_weights())
    batch = rollout.run(episode_chunks(config.seed, 1, 64, 64))
    grid = rollout.grid
    with torch.no_grad():
        reference = learner.reference(grid.tau.unsqueeze(1), batch.states)
    expected = -0.5 * grid.g2.unsqueeze(1) * (reference - batch.actions).pow(2).sum(-1)
    assert torch.allclose(batch.running_rewards, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained")
    train(_config(episodes=150), run_dir, echo=_quiet)
    return run_dir


def _generated_reward(config, run_dir) -> float:
    dataset = load_dataset(config.data, config.seed)
    rollout = build_rollout(config, dataset.points, terminal_reward=None)
    rollout.set_weights(load_checkpoint(run_dir / "checkpoint.pt")["learner"]["policy"])
    return float(rollout.generate(4000, torch.Generator().manual_seed(5))[:, 0].mean())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ddpo_sf", "ddpo_is", "dpok", "ct_finetune", "qlearning"])
def test_each_algorithm_raises_the_reward_from_the_pretrained_run(algorithm, pretrained, tmp_path):
    """Linear reward h = x0: fine-tuning from the beta = 0 run moves the generated mean of x0 up."""
    extra = {"inner_steps": 2, "is_clip": 0.2} if algorithm == "ddpo_is" else {}
    config = _config(algorithm, beta=1.0, episodes=150, init=str(pretrained), **extra)
    summary = train(config, tmp_path / algorithm, echo=_quiet)
    before, after = _generated_reward(config, pretrained), _generated_reward(config, tmp_path / algorithm)
    assert after > before + 0.1, (before, after)
    assert summary["episodes"] == 150


def test_init_starts_from_the_run_and_checks_it(pretrained, tmp_path):
    config = _config(episodes=1, init=str(pretrained), lr_policy=1e-12, lr_value=1e-12)
    train(config, tmp_path / "one", echo=_quiet)
    start = load_checkpoint(pretrained / "checkpoint.pt")["learner"]["policy"]
    after = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["learner"]["policy"]
    for key, tensor in start.items():
        assert torch.allclose(tensor, after[key], atol=1e-8), key
    with pytest.raises(DistqError, match="train.init: no checkpoint at"):
        train(_config(init=str(tmp_path / "nothing")), tmp_path / "two", echo=_quiet)
    wider = config_from_dict({**_config(init=str(pretrained)).to_dict(), "model": {"hidden": 32}})
    with pytest.raises(DistqError, match="train.init: .* model.hidden 16, this run 32"):
        train(wider, tmp_path / "three", echo=_quiet)
    embedded = config_from_dict({**_config(init=str(pretrained)).to_dict(), "model": {"hidden": 16,
                                                                                      "time_frequencies": 4}})
    with pytest.raises(DistqError, match="train.init: .* model.time_frequencies 0, this run 4"):
        train(embedded, tmp_path / "four", echo=_quiet)
    assert not any((tmp_path / name).exists() for name in ("two", "three", "four"))


@pytest.mark.ray
@pytest.mark.parametrize("algorithm, loss", [("ddpo_sf", "loss/policy_gradient"), ("dsm", "loss/dsm")])
def test_baselines_distribute_over_ray_workers_with_the_same_updates(ray_session, algorithm, loss):
    """ddpo_sf and dsm with W = 2 Ray rollout actors (no running rewards cross) equal the in-process run; at
    beta = 1 the dsm actors draw their rows by the weights exp(beta h) they compute themselves."""
    from distq.backends.backend import InProcessBackend
    from distq.backends.ray_actors import RayBackend

    states = {}
    for workers in (0, 2):
        config = config_from_dict({**_config(algorithm, beta=1.0, episodes=3, chunk_size=32).to_dict(),
                                   "parallel": {"workers": workers, "num_cpus_per_worker": 0.5,
                                                "learner_num_cpus": 0.5}})
        dataset = load_dataset(config.data, config.seed)
        reward = load_reward(config.reward, dataset.points[:8])
        backend = (RayBackend(config, dataset, reward, None) if workers else InProcessBackend(config, dataset, reward))
        try:
            for episode in (1, 2, 3):
                assert loss in backend.step(episode)
            states[workers] = backend.learner_state()
        finally:
            backend.close()
    assert "value" not in states[0]
    for key, tensor in states[0]["policy"].items():
        assert torch.allclose(states[2]["policy"][key], tensor, atol=1e-6), key
