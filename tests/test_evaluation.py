"""distq.training.evaluation: the perfect learner's samples land on the closed-form tilt of the data (E7)."""
import pytest
import torch

from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.setup.config import config_from_dict
from distq.training.evaluation import evaluate_perfect_learner, perfect_learner_samples


def _setup(beta, bandwidth=0.0):
    config = config_from_dict({"seed": 0, "data": {"source": "gaussian", "mean": [1.0, -1.0], "std": 1.0,
                                                   "n_samples": 2000},
                               "reward": {"fn": "linear", "coef": [1.0, 0.0]}, "sde": {"dt": 0.05},
                               "ratio": {"bandwidth": bandwidth}, "train": {"beta": beta},
                               "eval": {"n_samples": 500, "batches": 4}})
    dataset = load_dataset(config.data, config.seed)
    return config, dataset, load_reward(config.reward, dataset.points)


def test_perfect_learner_samples_the_tilted_gaussian():
    """N(m, I) tilted by exp(beta x_0) is N(m + beta e_0, I): the samples' mean moves by beta in x_0 only, and with
    ratio.bandwidth h their spread is that of the smoothed data, sqrt(1 + h^2), up to the 100-step sampler."""
    beta = 0.8
    config, dataset, reward = _setup(beta)
    samples = perfect_learner_samples(config, dataset, reward, 4000, torch.Generator().manual_seed(1))
    shift = samples.mean(0) - dataset.points.mean(0)
    assert abs(float(shift[0]) - beta) < 0.1 and abs(float(shift[1])) < 0.1, shift
    assert torch.allclose(samples.std(0), torch.ones(2), atol=0.1)
    config, dataset, reward = _setup(0.0, bandwidth=1.0)
    smoothed = perfect_learner_samples(config, dataset, reward, 4000, torch.Generator().manual_seed(1))
    assert torch.allclose(smoothed.std(0), torch.full((2,), 2 ** 0.5), atol=0.1)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_perfect_learner_with_a_generation_only_sampler_samples_the_tilted_gaussian(sampler):
    """The deterministic generation-only samplers, driven by the exact tilted score over 100 steps, land on the tilt
    N(m + beta e_0, I) too."""
    beta = 0.8
    config, dataset, reward = _setup(beta)
    samples = perfect_learner_samples(config, dataset, reward, 4000, torch.Generator().manual_seed(1), sampler)
    shift = samples.mean(0) - dataset.points.mean(0)
    assert abs(float(shift[0]) - beta) < 0.1 and abs(float(shift[1])) < 0.1, shift
    assert torch.allclose(samples.std(0), torch.ones(2), atol=0.1)


def test_evaluate_perfect_learner_reports_the_run_metrics():
    config, dataset, reward = _setup(0.0)
    metrics = evaluate_perfect_learner(config, dataset, reward)
    assert metrics["n_samples"] == 2000 and abs(metrics["kl_mean"]) < 0.1 and abs(metrics["reward_mean"] - 1) < 0.1


def test_conditional_evaluation_passes_each_sample_s_condition_value_to_the_reward():
    """h(x, c) = c on a mixture conditioned on its component (values 0, 1): each condition's mean reward is its value
    exactly, and the headline mean is the share of condition 1 among the drawn conditions."""
    from distq.backends.build import build_rollout
    from distq.problems.rewards import Reward
    from distq.training.evaluation import evaluate_policy

    config = config_from_dict({"seed": 0, "data": {"source": "gmm1d", "n_samples": 200, "condition": "label"},
                               "reward": {"fn": "gmm1d_right"}, "sde": {"dt": 0.5},
                               "eval": {"n_samples": 20, "batches": 2}})
    dataset = load_dataset(config.data, config.seed)
    reward = Reward(lambda x, c: c.float(), "condition", dataset.condition_values)
    rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels)
    metrics, _, conditions = evaluate_policy(rollout, dataset, reward, config)
    assert {k: v["reward_mean"] for k, v in metrics["per_condition"].items()} == {"0": 0.0, "1": 1.0}
    assert metrics["reward_mean"] == pytest.approx(float(conditions.float().mean()))


def test_a_conditional_reward_in_a_list_gets_each_sample_s_condition_value():
    """reward.fn [h(x, c) = c, gmm1d_right] weighted (2, 1) on the conditioned mixture: the conditional entry's own
    mean is the share of condition 1 among the drawn conditions, the other's is recomputed from the samples, and the
    headline mean is the weighted sum of the two."""
    from distq.backends.build import build_rollout
    from distq.problems.rewards import Reward, RewardSum, gmm1d_right
    from distq.training.evaluation import evaluate_policy

    config = config_from_dict({"seed": 0, "data": {"source": "gmm1d", "n_samples": 200, "condition": "label"},
                               "reward": {"fn": "gmm1d_right"}, "sde": {"dt": 0.5},
                               "eval": {"n_samples": 20, "batches": 2}})
    dataset = load_dataset(config.data, config.seed)
    parts = [Reward(lambda x, c: c.float(), "condition", dataset.condition_values),
             Reward(gmm1d_right, "gmm1d_right", dataset.condition_values)]
    reward = RewardSum(parts, (2.0, 1.0), ("condition", "gmm1d_right"))
    rollout = build_rollout(config, dataset.points, reward, labels=dataset.labels)
    metrics, samples, conditions = evaluate_policy(rollout, dataset, reward, config)
    assert metrics["reward_mean/condition"] == pytest.approx(float(conditions.float().mean()))
    assert metrics["reward_mean"] == pytest.approx(2 * metrics["reward_mean/condition"]
                                                   + metrics["reward_mean/gmm1d_right"], rel=1e-5)
    assert metrics["reward_mean/gmm1d_right"] == pytest.approx(float(gmm1d_right(samples).mean()), rel=1e-5)


def test_knn_kl_flagged_unreliable_in_high_dimension():
    from distq.setup.config import config_from_dict
    from distq.training.evaluation import kl_reliability

    config = config_from_dict({"eval": {"n_samples": 300}})  # 2 log2(300) = 16.5
    assert kl_reliability(config, 2) == {"kl_reliable": True}
    assert kl_reliability(config, 16)["kl_reliable"]
    flagged = kl_reliability(config, 500)
    assert not flagged["kl_reliable"] and "500 columns" in flagged["kl_warning"] and "eval.pca" in flagged["kl_warning"]
    assert kl_reliability(config_from_dict({"eval": {"n_samples": 300, "pca": 8}}), 500)["kl_reliable"]


def test_per_reward_mean_and_ci_of_given_samples_match_a_hand_computation():
    """reward.fn [brightness, linear (1, 0)] with weights (1, 2) on 40 given samples (2 batches of 20): each reward's
    mean and 95% CI half-width 1.96 sd / sqrt(n) by hand, and the headline reward is the weighted sum's."""
    import math

    from distq.training.evaluation import evaluate_given

    config = config_from_dict({"seed": 0, "data": {"source": "gaussian", "mean": [0.0, 0.0], "n_samples": 100},
                               "reward": {"fn": ["brightness", "linear"], "coef": [1.0, 0.0], "weights": [1.0, 2.0]},
                               "eval": {"n_samples": 20, "batches": 2, "k": 5}})
    dataset = load_dataset(config.data, config.seed)
    samples = torch.arange(80, dtype=torch.float32).reshape(40, 2) / 10  # rows (x0, x0 + 0.1)
    metrics = evaluate_given(samples, dataset, load_reward(config.reward, dataset.points), config)

    def mean_ci(values: list[float]) -> tuple[float, float]:
        m = sum(values) / len(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
        return m, 1.96 * sd / math.sqrt(len(values))

    x0 = [i / 5 for i in range(40)]
    for name, values in (("brightness", [x + 0.05 for x in x0]), ("linear", x0)):
        mean, ci = mean_ci(values)
        assert metrics[f"reward_mean/{name}"] == pytest.approx(mean)
        assert metrics[f"reward_ci95/{name}"] == pytest.approx(ci)
    assert metrics["reward_mean"] == pytest.approx(mean_ci([3 * x + 0.05 for x in x0])[0])
