"""Paper-scale speed: distq's episode against the same Algorithm 1 as a plain torch loop, and where its time goes."""
from __future__ import annotations

import math
import statistics
import time

import torch

from distq.algorithms.batch import episode_chunks
from distq.backends.build import build_learner, build_rollout
from distq.maths.policy import StepMeans
from distq.problems.data import load_dataset
from distq.problems.rewards import load_reward
from distq.setup.config import config_from_dict
from distq.setup.machine import keep_freed_memory

PAPER_SCALE = {"data": {"source": "swiss_roll", "n_samples": 300}, "reward": {"fn": "swiss_roll_rectangle"},
               "sde": {"T": 5.0, "dt": 0.25}, "train": {"batch_size": 300, "beta": 1.0}}


def _setup(overrides: dict | None = None):
    config = config_from_dict({**PAPER_SCALE, **(overrides or {})})
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    learner = build_learner(config, dataset.points, reward)
    rollout = build_rollout(config, dataset.points, reward, policy=learner.policy)
    return config, dataset, reward, learner, rollout


def distq_episode(config, learner, rollout):
    """One full episode of distq: rollout, then the learner update."""
    def run(episode: int) -> None:
        learner.update(rollout.run(episode_chunks(config.seed, episode, config.train.batch_size,
                                                  config.train.chunk_size)))
    return run


def plain_episode(config, dataset, reward):
    """The same Algorithm 1 written plainly (nn.Tanh, default Adam, cdist + softmax per step): the reference."""
    d, K, dt, theta, beta = dataset.dim, config.sde.num_steps, config.sde.dt, config.train.temperature, config.train.beta
    net = lambda out: torch.nn.Sequential(torch.nn.Linear(d + 1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                          torch.nn.ReLU(), torch.nn.Linear(64, out))
    policy, value = net(d), net(1)
    opt_p, opt_v = torch.optim.Adam(policy.parameters(), 1e-3), torch.optim.Adam(value.parameters(), 1e-3)
    data, B, T = dataset.points, config.train.batch_size, config.sde.T

    def run(episode: int) -> None:
        y = torch.randn(B, d)
        taus, states, actions, rewards = [], [], [], []
        with torch.no_grad():
            for k in range(K):
                tau = k * dt
                t = T - tau
                mu, s2 = math.exp(-t), 1 - math.exp(-2 * t)
                inp = torch.cat([y, torch.full((B, 1), tau / T)], 1)
                a = policy(inp) + math.sqrt(theta / 2) * torch.randn(B, d)
                w = torch.softmax(-torch.cdist(y, mu * data).pow(2) / (2 * s2), 1)
                score = (-y + mu * w @ data) / s2
                taus.append(inp), states.append(y), actions.append(a)
                rewards.append(-(score - a).pow(2).sum(1))
                y = y + (y + 2 * a) * dt + math.sqrt(2 * dt) * torch.randn(B, d)
        inp, a, r = torch.stack(taus), torch.stack(actions), torch.stack(rewards)
        J = value(inp).squeeze(-1)
        q = -(a - policy(inp)).pow(2).sum(-1) - theta * d / 2 * math.log(2 * math.pi * theta / 2)
        nxt = torch.cat([J[1:].detach(), beta * reward(y)[None]])
        loss = 0.5 * (nxt - J + (r - q) * dt).pow(2).sum(0).mean()
        opt_p.zero_grad(), opt_v.zero_grad()
        loss.backward()
        opt_p.step(), opt_v.step()
    return run


def _rate(run, start: int, episodes: int) -> float:
    began = time.perf_counter()
    for e in range(start, start + episodes):
        run(e)
    return episodes / (time.perf_counter() - began)


def _split(config, learner, rollout) -> dict[str, float]:
    """Milliseconds per episode spent in the ratio estimator, the rollout's network calls, the learner's
    forward/backward and the optimiser step."""
    batch = rollout.run(episode_chunks(0, 0, config.train.batch_size, config.train.chunk_size))
    grid, reps = rollout.grid, 30
    def timed(fn) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - began) / reps * 1e3
    with torch.inference_mode():
        ratio = timed(lambda: [rollout.ratio.score(batch.states[k], float(grid.mu[k]), float(grid.sigma2[k]))
                               for k in range(grid.num_steps)])
        def policy_means():
            means = StepMeans(rollout.policy, rollout._coefficients)
            return [means(k, batch.states[k]) for k in range(grid.num_steps)]
        policy = timed(policy_means)
    def backward():
        for opt in learner.optimizers.values():
            opt.zero_grad()
        learner.objective.loss(learner, batch, batch.batch_size)[0].backward()
    networks = timed(backward)
    optimizer = timed(lambda: [opt.step() for opt in learner.optimizers.values()])
    total = 1e3 / _rate(distq_episode(config, learner, rollout), 0, reps)
    return {"ratio_estimator_ms": ratio, "rollout_networks_ms": policy, "learner_forward_backward_ms": networks,
            "optimizer_ms": optimizer, "episode_ms": total,
            "other_ms": total - ratio - policy - networks - optimizer}


def bench_core(rounds: int, episodes: int) -> dict:
    """Episodes/s at paper scale (N = 300, d = 2, B = 300, K = 20, sde) of distq (one process with 1 or 2 torch
    threads, or train.processes = 2 with 1 thread each) and of the plain loop (1 or 2 threads)."""
    from distq.backends.two_process import TwoProcessBackend

    config, dataset, reward, learner, rollout = _setup()
    keep_freed_memory()  # as distq.training.trainer does; the plain loop gets the same allocator
    two = TwoProcessBackend(config_from_dict({**PAPER_SCALE, "train": {**PAPER_SCALE["train"], "processes": 2}}),
                            dataset, reward)
    distq, plain = distq_episode(config, learner, rollout), plain_episode(config, dataset, reward)
    variants = {"distq_threads1": (distq, 1), "plain_torch_threads1": (plain, 1), "distq_processes2": (two.step, 1),
                "distq_threads2": (distq, 2), "plain_torch_threads2": (plain, 2)}
    rates = {name: [] for name in variants}
    try:
        for r in range(rounds):
            for name, (run, threads) in variants.items():
                torch.set_num_threads(threads)
                run(1)
                rates[name].append(_rate(run, r * episodes + 2, episodes))
    finally:
        two.close()
    torch.set_num_threads(1)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "setting": "swiss_roll N=300 d=2 B=300 K=20 sde, paper Table 1 networks",
        "episodes_per_s_median": median, "episodes_per_s_rounds": rates,
        "speedup_vs_plain_threads1": median["distq_threads1"] / median["plain_torch_threads1"],
        "speedup_vs_plain_threads2": median["distq_threads2"] / median["plain_torch_threads2"],
        "speedup_processes2_vs_plain_threads2": median["distq_processes2"] / median["plain_torch_threads2"],
        **{f"minutes_for_50000_episodes_{name}": 50000 / median[f"distq_{name}"] / 60
           for name in ("threads1", "threads2", "processes2")},
        "split_threads1_ms": _split(config, learner, rollout),
    }
