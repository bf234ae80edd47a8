"""Going parallel: the in-process loop against Ray rollout actors, Ray's own floor, and RLlib's env runner."""
from __future__ import annotations

import os
import statistics
import time

import torch

from distq.components import build_learner
from distq.config import config_from_dict
from distq.data import load_dataset
from distq.rewards import load_reward
from distq.rollout import episode_chunks
from distq.runtime import keep_freed_memory

from .speed import PAPER_SCALE, _setup


def _backend_rate(backend, episodes: int) -> tuple[float, list[dict]]:
    """Episodes/s of a backend over episodes 2..episodes+1 (episode 1 warms up: actor start-up is not timed)."""
    try:
        backend.step(1)
        began = time.perf_counter()
        metrics = [backend.step(e) for e in range(2, episodes + 2)]
        return episodes / (time.perf_counter() - began), metrics
    finally:
        backend.close()


def _ray_floor(repeats: int = 200) -> dict[str, float]:
    """Ray's own cost on this machine, with no work: an empty actor call's round trip, and the update's chain
    (a worker returns a trajectory-sized tensor, the learner takes it by reference and returns weights-sized
    tensors) as plain actor tasks and as a compiled graph (ray.dag); milliseconds, medians over `repeats`."""
    import ray
    from ray.dag import InputNode

    @ray.remote(num_cpus=0.5)
    class Worker:
        def run(self, weights: torch.Tensor) -> torch.Tensor:
            return torch.zeros(30900)  # 123,600 bytes: a paper-scale batch

        def noop(self) -> int:
            return 0

    @ray.remote(num_cpus=0.5)
    class Learner:
        def update(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.zeros(4549)  # 18,196 bytes: the policy weights

    def timed(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return 1e3 * statistics.median(times)

    worker, learner = Worker.remote(), Learner.remote()
    weights = torch.zeros(4549)
    result = {"empty_call_round_trip_ms": timed(lambda: ray.get(worker.noop.remote())),
              "update_chain_tasks_ms": timed(lambda: ray.get(learner.update.remote(worker.run.remote(weights))))}
    with InputNode() as given:
        graph = learner.update.bind(worker.run.bind(given)).experimental_compile()
    try:
        result["update_chain_compiled_graph_ms"] = timed(lambda: ray.get(graph.execute(weights)))
    finally:
        graph.teardown()
        for actor in (worker, learner):
            ray.kill(actor)
    return result


def bench_parallel(rounds: int, episodes: int) -> dict:
    """Episodes/s at paper scale (N = 300, d = 2, B = 300, K = 20, sde) of the in-process loop and of Ray backends
    (W = 1, 2 rollout actors; sync and async), the same episodes each, alternated in rounds in one local Ray
    instance; the time split per episode and the bytes an update moves (computed from tensor sizes)."""
    import logging

    import ray

    from distq.parallel import RayBackend
    from distq.train import InProcessBackend

    variants = {"in_process": (0, "sync"), "w1_sync": (1, "sync"), "w2_sync": (2, "sync"),
                "w1_async": (1, "async"), "w2_async": (2, "async")}
    # chunks of 150: with W = 2 each worker generates half of the B = 300 batch
    train = {**PAPER_SCALE["train"], "chunk_size": 150, "episodes": episodes + 1}
    configs = {name: config_from_dict({**PAPER_SCALE, "train": train, "parallel": {
        "workers": workers, "mode": mode, "num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5}})
        for name, (workers, mode) in variants.items()}
    config = configs["in_process"]
    dataset = load_dataset(config.data, config.seed)
    reward = load_reward(config.reward, dataset.points[:8])
    rates, metrics = {name: [] for name in variants}, {name: [] for name in variants}
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    keep_freed_memory()  # as distq.train does; the actors do the same
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        for _ in range(rounds):
            for name, cfg in configs.items():
                backend = (InProcessBackend(cfg, dataset, reward) if cfg.parallel.workers == 0
                           else RayBackend(cfg, dataset, reward, None))
                rate, steps = _backend_rate(backend, episodes)
                rates[name].append(rate)
                metrics[name] += steps
                print(f"{name}: {rate:.1f} episodes/s", flush=True)
        floor = _ray_floor()
    finally:
        ray.shutdown()
    median = {name: statistics.median(r) for name, r in rates.items()}
    K, B, d = config.sde.num_steps, config.train.batch_size, dataset.dim
    weights = sum(t.numel() * t.element_size() for t in build_learner(config, dataset.points, reward)
                  .policy_weights().values())
    trajectories = 4 * (2 * K * B * d + K * B + B * d + B)  # float32 states, actions, r_hat, Y_K, h(Y_K)
    def mean(name: str, key: str) -> float:
        return statistics.fmean(m[key] for m in metrics[name] if key in m) if key in metrics[name][0] else 0.0
    return {
        "setting": "swiss_roll N=300 d=2 B=300 K=20 sde, chunk_size 150, paper Table 1 networks; Ray actors with "
                   "0.5 CPU each on one 2-core machine, one local Ray instance",
        "episodes_per_variant_per_round": episodes, "rounds": rounds,
        "episodes_per_s_median": median, "episodes_per_s_rounds": rates,
        "ratio_vs_in_process": {name: median[name] / median["in_process"] for name in variants},
        "time_split_ms_mean": {name: {key: 1e3 * mean(name, f"time/{key}_s") for key in ("rollout", "transfer", "update")}
                               for name in variants},
        "policy_lag_mean": {name: mean(name, "parallel/policy_lag") for name in variants},
        "bytes_per_update": {
            "weights_one_copy": weights, "trajectories": trajectories,
            **{name: workers * weights + (trajectories if workers else 0) for name, (workers, _) in variants.items()},
            "measured_by_backend": {name: mean(name, "parallel/bytes_per_update") for name in variants if name != "in_process"}},
        "ray_floor_ms": floor,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }


def bench_rllib(rounds: int, timesteps: int) -> dict:
    """Environment steps per second at paper scale: distq's batched rollout (B = 300 trajectories of K = 20 steps,
    policy forward, exploration noise and ratio rewards included) against the same MDP (distq.rllib_env) stepped
    by RLlib's SingleAgentEnvRunner with random actions (no policy at all), 1 and 8 env copies per runner."""
    import logging

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from distq.rllib_env import register

    config, _, _, _, rollout = _setup()
    name = register()
    rates: dict[str, list[float]] = {"distq_rollout": [], "rllib_env_runner_1_env": [], "rllib_env_runner_8_envs": []}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        runners = {key: SingleAgentEnvRunner(config=PPOConfig().environment(name, env_config=PAPER_SCALE)
                                             .env_runners(num_envs_per_env_runner=envs))
                   for key, envs in (("rllib_env_runner_1_env", 1), ("rllib_env_runner_8_envs", 8))}
        batch_steps = config.train.batch_size * config.sde.num_steps
        for r in range(rounds):
            began, episodes = time.perf_counter(), max(1, timesteps // batch_steps)
            for e in range(episodes):
                rollout.run(episode_chunks(config.seed, r * episodes + e, config.train.batch_size,
                                           config.train.chunk_size))
            rates["distq_rollout"].append(episodes * batch_steps / (time.perf_counter() - began))
            for key, runner in runners.items():
                began = time.perf_counter()
                runner.sample(num_timesteps=timesteps, random_actions=True)
                rates[key].append(timesteps / (time.perf_counter() - began))
        for runner in runners.values():
            runner.stop()
    finally:
        ray.shutdown()
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {"setting": "swiss_roll N=300 d=2, K=20 sde steps per episode; distq B=300 per batch, one thread",
            "env_steps_per_s_median": median, "env_steps_per_s_rounds": rates,
            "distq_vs_rllib": {k: median["distq_rollout"] / v for k, v in median.items() if k.startswith("rllib")}}
