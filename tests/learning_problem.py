"""The small Gaussian problem tests/test_learner.py and tests/test_q_learning.py train on: a 2D Gaussian, a linear
reward, 10 ou steps, networks of 16 units with non-zero last layers, and the loop form of (E15)-(E16) written out."""
import math

import torch

from distq.algorithms.batch import episode_chunks
from distq.backends.build import build_learner, build_rollout
from distq.setup.config import config_from_dict

T, DT, D, B = 5.0, 0.5, 2, 12
K = int(T / DT)
THETA, BETA, G2 = 0.5, 1.5, 2.0  # ou: g^2 = 2
METRIC_KEYS = {"loss/td", "td/abs_mean", "reward/terminal_mean", "reward/running_mean", "grad_norm/policy",
               "grad_norm/value", "lr/policy", "time/update_s"}


def make_config(seed=3, episodes=100, lr_schedule="constant", grad_clip=None, sampler="sde", policy_gradient="td",
            batch_size=B, target_rate=0.0, ema_rate=0.0):
    return config_from_dict({
        "seed": seed,
        "data": {"source": "gaussian", "mean": [1.0, -1.0], "std": 0.7},
        "reward": {"fn": "linear", "coef": [1.0, 0.5]},
        "sde": {"T": T, "dt": DT, "sampler": sampler},
        "model": {"hidden": 16},
        "train": {"batch_size": batch_size, "chunk_size": 5, "temperature": THETA, "beta": BETA, "episodes": episodes,
                  "lr_schedule": lr_schedule, "grad_clip": grad_clip, "lr_policy": 1e-3, "lr_value": 2e-3,
                  "policy_gradient": policy_gradient, "target_rate": target_rate,
                  "ema_rate": ema_rate},
    })


def make_points(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([1.0, -1.0]) + 0.7 * torch.randn(n, D, generator=gen)


def reward(x):
    return x @ torch.tensor([1.0, 0.5])


def perturb(net, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net[-1].parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def setup(config=None, episode=1):
    config = config or make_config()
    points = make_points()
    learner = build_learner(config, points, reward)
    perturb(learner.policy.net, 11)  # non-zero last layers: gradients reach every parameter
    perturb(learner.value.net, 12)
    if learner.target is not None:  # the target starts as a copy of J_phi
        learner.target.load_state_dict(learner.value.state_dict())
    if learner.average is not None:  # and the policy's average as a copy of the policy
        learner.average.load_state_dict(learner.policy.state_dict())
    rollout = build_rollout(config, points, reward, policy=learner.policy)
    return learner, rollout, config


def make_batch(rollout, config, episode=1):
    return rollout.run(episode_chunks(config.seed, episode, config.train.batch_size, config.train.chunk_size))


def loop_deltas(learner, batch, bootstrap=None):
    """(E15) step by step: J_phi(tau_k, Y_k), q_psi (E11) written out, next values detached (from the network
    `bootstrap`, default J_phi), J(T, .) = beta h."""
    bootstrap = bootstrap or learner.value
    values, qs, deltas = [], [], []
    for k in range(K):
        tau = torch.tensor(k * DT)
        value = learner.value(tau, batch.states[k])
        mean = learner.policy(tau, batch.states[k])
        q = -0.5 * G2 * (batch.actions[k] - mean).pow(2).sum(-1) - 0.5 * THETA * D * math.log(2 * math.pi * THETA / G2)
        with torch.no_grad():
            nxt = (bootstrap(torch.tensor((k + 1) * DT), batch.states[k + 1]) if k + 1 < K
                   else BETA * batch.terminal_rewards)
        values.append(value)
        qs.append(q)
        deltas.append(nxt - value + (batch.running_rewards[k] - q) * DT)
    return values, qs, deltas


def expected_gradients(learner, batch):
    values, qs, deltas = loop_deltas(learner, batch)
    value_params, policy_params = list(learner.value.parameters()), list(learner.policy.parameters())
    # (E16): phi moves along sum_k delta_k grad J_phi, psi along sum_k delta_k grad q_psi (here times dt);
    # the loss gradient is minus that, averaged over the batch.
    value_surrogate = sum((d.detach() * v).sum() for d, v in zip(deltas, values))
    policy_surrogate = sum((d.detach() * q).sum() for d, q in zip(deltas, qs))
    grad_value = torch.autograd.grad(value_surrogate, value_params)
    grad_policy = torch.autograd.grad(policy_surrogate, policy_params)
    return ([-g / B for g in grad_value], [-DT * g / B for g in grad_policy],
            torch.stack([d.detach() for d in deltas]))


def params(learner):
    return [p.detach().clone() for p in list(learner.policy.parameters()) + list(learner.value.parameters())]
