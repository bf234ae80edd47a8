"""distq.algorithms.learner: what every objective's update shares (shown with Algorithm 1's): an update's metrics,
divergence handling, checkpoint round trips with the averaged copies, the moving-average policy, train.init, the
learning-rate schedules and gradient clipping."""
import copy
import math

import learning_problem as problem
import pytest
import torch
from learning_problem import DT, METRIC_KEYS, B

from distq.algorithms.batch import Trajectories
from distq.algorithms.learner import TrainingDiverged, deployed_policy, with_initial_policy
from distq.backends.build import build_learner, build_rollout
from distq.errors import DistqError
from distq.problems.rewards import load_reward
from distq.setup.config import config_from_dict


def test_update_changes_parameters_and_returns_metrics():
    learner, rollout, config = problem.setup()
    batch = problem.make_batch(rollout, config)
    grad_value, grad_policy, delta = problem.expected_gradients(learner, batch)
    before = problem.params(learner)
    metrics = learner.update(batch)
    assert METRIC_KEYS <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["loss/td"] == pytest.approx(0.5 * float(delta.square().sum(0).mean()), rel=1e-5)
    assert metrics["td/abs_mean"] == pytest.approx(float(delta.abs().mean()), rel=1e-5)
    assert metrics["reward/terminal_mean"] == pytest.approx(float(problem.reward(batch.final_states).mean()), rel=1e-5)
    assert metrics["reward/running_mean"] == pytest.approx(DT * float(batch.running_rewards.sum(0).mean()), rel=1e-5)
    # Norms before clipping, of the (E16) gradients.
    assert metrics["grad_norm/value"] == pytest.approx(float(torch.cat([g.flatten() for g in grad_value]).norm()),
                                                       rel=1e-4)
    assert metrics["grad_norm/policy"] == pytest.approx(float(torch.cat([g.flatten() for g in grad_policy]).norm()),
                                                        rel=1e-4)
    assert metrics["lr/policy"] == pytest.approx(1e-3)
    after = problem.params(learner)
    n_policy = len(list(learner.policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before[:n_policy], after[:n_policy]))
    assert any(not torch.equal(a, b) for a, b in zip(before[n_policy:], after[n_policy:]))
    # Adam's first step moves every parameter with a non-zero gradient by about lr.
    step = max(float((a - b).abs().max()) for a, b in zip(before[n_policy:], after[n_policy:]))
    assert step == pytest.approx(2e-3, rel=1e-2)
    assert learner.updates == 1



@pytest.mark.parametrize("algorithm", ["qlearning", "ddpo_sf", "dsm"])
def test_a_list_reward_s_update_reports_each_reward_s_batch_mean_from_one_evaluation(algorithm):
    """reward.fn [linear (1, 0.5), brightness] weighted (2, 0.5): the update's reward/terminal_mean/<name> are the
    means of x @ c and of x.mean(-1) over the batch's final states (dsm: its data points), recomputed here; their
    weighted sum is reward/terminal_mean; the rollout evaluated each reward once."""
    config = config_from_dict({**problem.make_config().to_dict(), "reward": {"fn": ["linear", "brightness"], "coef": [1.0, 0.5],
                                                                 "weights": [2.0, 0.5]},
                               "train": {**problem.make_config().to_dict()["train"], "algorithm": algorithm}})
    points = problem.make_points()
    reward = load_reward(config.reward, points)
    learner = build_learner(config, points, reward)
    rollout = build_rollout(config, points, reward, policy=learner.policy)
    calls = []
    for entry in reward.rewards:
        entry.fn = (lambda fn: lambda x: calls.append(x.shape[0]) or fn(x))(entry.fn)
    batch = problem.make_batch(rollout, config)
    assert calls == [B, B]
    metrics = learner.update(batch)
    x = batch.final_states
    expected = {"linear": float((x @ torch.tensor([1.0, 0.5])).mean()), "brightness": float(x.mean(-1).mean())}
    assert {k for k in metrics if k.startswith("reward/terminal_mean/")} == {f"reward/terminal_mean/{n}"
                                                                             for n in expected}
    for name, mean in expected.items():
        assert metrics[f"reward/terminal_mean/{name}"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert metrics["reward/terminal_mean"] == pytest.approx(2 * expected["linear"] + 0.5 * expected["brightness"],
                                                            rel=1e-5)



@pytest.mark.parametrize("field", ["running_rewards", "terminal_rewards", "actions"])
def test_non_finite_batch_raises_and_leaves_parameters(field):
    learner, rollout, config = problem.setup()
    batch = problem.make_batch(rollout, config)
    tensors = {name: getattr(batch, name).clone() for name in
               ("states", "actions", "running_rewards", "final_states", "terminal_rewards")}
    tensors[field].view(-1)[3] = float("nan")
    bad = Trajectories(**tensors)
    before = problem.params(learner)
    with pytest.raises(TrainingDiverged) as info:
        learner.update(bad)
    assert isinstance(info.value, DistqError) and "update 1" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, problem.params(learner)))
    assert learner.updates == 0
    assert math.isfinite(learner.update(batch)["loss/td"])  # the learner is still usable



def test_state_dict_round_trip_reproduces_next_update():
    config = problem.make_config(lr_schedule="cosine", episodes=10)
    learner, rollout, _ = problem.setup(config)
    for episode in (1, 2):
        learner.update(problem.make_batch(rollout, config, episode))
    state = copy.deepcopy(learner.state_dict())  # as written to a checkpoint
    other = build_learner(problem.make_config(seed=9, lr_schedule="cosine", episodes=10), problem.make_points(), problem.reward)
    assert not all(torch.equal(a, b) for a, b in zip(problem.params(learner), problem.params(other)))
    other.load_state_dict(state)
    assert other.updates == 2
    batch = problem.make_batch(rollout, config, 3)
    ours, theirs = learner.update(batch), other.update(batch)
    for key in METRIC_KEYS - {"time/update_s"}:
        assert ours[key] == theirs[key], key
    assert all(torch.equal(a, b) for a, b in zip(problem.params(learner), problem.params(other)))



@pytest.mark.parametrize("rate, copy_name", [("target_rate", "target"), ("ema_rate", "average")])
def test_state_dict_round_trip_keeps_the_averaged_copies(rate, copy_name):
    """The target value network and the policy's moving average survive a state_dict round trip, and the next update
    moves them (and everything else) identically."""
    config = problem.make_config(**{rate: 0.1})
    learner, rollout, _ = problem.setup(config)
    for episode in (1, 2):
        learner.update(problem.make_batch(rollout, config, episode))
    other = build_learner(problem.make_config(seed=9, **{rate: 0.1}), problem.make_points(), problem.reward)
    other.load_state_dict(copy.deepcopy(learner.state_dict()))
    ours, theirs = getattr(learner, copy_name), getattr(other, copy_name)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    batch = problem.make_batch(rollout, config, 3)
    assert learner.update(batch)["loss/td"] == other.update(batch)["loss/td"]
    assert all(torch.equal(a, b) for a, b in zip(problem.params(learner), problem.params(other)))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))



def test_policy_average_moves_by_the_rate_and_is_what_the_run_deploys():
    """avg <- avg + rate (psi - avg) after each optimiser step of the policy; rollouts keep the trained weights."""
    learner, rollout, config = problem.setup(problem.make_config(ema_rate=0.25))
    average = [p.detach().clone() for p in learner.policy.parameters()]  # starts as the initial policy
    for episode in (1, 2, 3):
        learner.update(problem.make_batch(rollout, config, episode))
        average = [a + 0.25 * (p.detach() - a) for a, p in zip(average, learner.policy.parameters())]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(average, learner.average.parameters()))
    deployed, trained = learner.policy_weights(deployed=True), learner.policy_weights()
    assert all(torch.equal(a, b) for a, b in zip(learner.average.state_dict().values(), deployed.values()))
    assert all(torch.equal(a, b) for a, b in zip(learner.policy.state_dict().values(), trained.values()))
    assert not all(torch.allclose(a, b) for a, b in zip(deployed.values(), trained.values()))
    assert deployed_policy(learner.state_dict()).keys() == trained.keys()
    assert all(torch.equal(a, b) for a, b in zip(deployed_policy(learner.state_dict()).values(), deployed.values()))



def test_without_an_average_the_trained_policy_is_deployed():
    learner, rollout, config = problem.setup()
    learner.update(problem.make_batch(rollout, config, 1))
    assert learner.average is None and "policy_average" not in learner.state_dict()
    for weights in (learner.policy_weights(deployed=True), deployed_policy(learner.state_dict())):
        assert all(torch.equal(a, b) for a, b in zip(weights.values(), learner.policy.state_dict().values()))



def test_an_initial_policy_sets_every_policy_copy_and_keeps_the_value_network():
    """train.init: the policy, the moving average (ema_rate > 0) and what it deploys become the pretrained weights;
    the value network and the optimisers are untouched."""
    pretrained = build_learner(problem.make_config(seed=9), problem.make_points(), problem.reward).policy_weights()
    learner = build_learner(problem.make_config(ema_rate=0.1), problem.make_points(), problem.reward)
    state = learner.state_dict()
    learner.load_state_dict(with_initial_policy(state, pretrained))
    for net in (learner.policy, learner.average):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), pretrained.values()))
    assert all(torch.equal(a, b) for a, b in zip(deployed_policy(learner.state_dict()).values(), pretrained.values()))
    assert all(torch.equal(a, b) for a, b in zip(learner.value.state_dict().values(), state["value"].values()))
    assert "reference" not in with_initial_policy(state, pretrained)  # only the copies the learner has



def test_cosine_schedule_decays_to_zero():
    episodes = 100
    learner, rollout, config = problem.setup(problem.make_config(lr_schedule="cosine", episodes=episodes))
    batch = problem.make_batch(rollout, config)
    used, reported = [], []
    for _ in range(episodes):
        groups = (learner.optimizers["policy"].param_groups[0], learner.optimizers["value"].param_groups[0])
        used.append(tuple(group["lr"] for group in groups))
        reported.append(learner.update(batch)["lr/policy"])
    for i, (lr_policy, lr_value) in enumerate(used):
        factor = 0.5 * (1 + math.cos(math.pi * i / episodes))
        assert lr_policy == pytest.approx(1e-3 * factor, abs=1e-12)
        assert lr_value == pytest.approx(2e-3 * factor, abs=1e-12)
    assert used[0] == (1e-3, 2e-3)
    assert used[-1][0] < 1e-3 * 1e-3  # the last episode's step is ~0
    assert reported[-1] == pytest.approx(0.0, abs=1e-15)



def test_constant_schedule_keeps_lr():
    learner, rollout, config = problem.setup()
    batch = problem.make_batch(rollout, config)
    assert all(learner.update(batch)["lr/policy"] == pytest.approx(1e-3) for _ in range(3))



def test_grad_clip_reports_norm_before_clipping():
    learner, rollout, config = problem.setup(problem.make_config(grad_clip=1e-6))
    free, _, _ = problem.setup()
    batch = problem.make_batch(rollout, config)
    clipped_metrics, free_metrics = learner.update(batch), free.update(batch)
    for name in ("value", "policy"):
        assert clipped_metrics[f"grad_norm/{name}"] == pytest.approx(free_metrics[f"grad_norm/{name}"], rel=1e-6)
        assert clipped_metrics[f"grad_norm/{name}"] > 1e-4
        net = learner.value if name == "value" else learner.policy
        applied = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
        assert float(applied) == pytest.approx(1e-6, rel=1e-3)
