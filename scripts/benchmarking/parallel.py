"""Going parallel: in-process (1 or 2 processes), Ray rollout actors and ddp replicas side by side, the all-reduce's
cost, Ray's own floor, and RLlib's env runner."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from distq.algorithms.batch import episode_chunks
from distq.backends.ray_cluster import connect_ray
from distq.runs import rundir
from distq.setup.config import config_from_dict

from .speed import PAPER_SCALE, _setup


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


SETTINGS = {
    "paper": ({**PAPER_SCALE, "train": {**PAPER_SCALE["train"], "chunk_size": 150}}, 200,
              "swiss_roll N=300 d=2 B=300 K=20 sde, chunk_size 150, paper Table 1 networks"),
    "rollout_bound": ({"data": {"source": "gmm", "n_samples": 20000, "dim": 16}, "ratio": {"method": "exact"},
                       "reward": {"fn": "linear", "coef": [1.0] + [0.0] * 15}, "sde": {"T": 5.0, "dt": 0.25},
                       "train": {"batch_size": 300, "chunk_size": 150, "beta": 1.0}}, 30,
                      "gmm N=20,000 d=16 exact ratio estimator, B=300 K=20 sde, linear reward"),
    "digits": ({"data": {"source": "digits", "condition": "label"}, "reward": {"fn": "own_digit"},
                "sde": {"T": 5.0, "dt": 0.25}, "model": {"hidden": 128},
                "train": {"batch_size": 256, "chunk_size": 128, "beta": 1.0}}, 40,
               "class-conditional digits N=1,797 d=64, B=256 K=20 sde, hidden 128, own_digit reward"),
}
"""name -> (config, episodes per variant per round, description)."""
VARIANTS = {"in_process": ({}, {}), "processes2": ({"processes": 2}, {}),
            "sync_w2": ({}, {"workers": 2, "mode": "sync", "num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5}),
            "async_w2": ({}, {"workers": 2, "mode": "async", "num_cpus_per_worker": 0.5, "learner_num_cpus": 0.5}),
            "ddp_w1": ({}, {"workers": 1, "mode": "ddp", "num_cpus_per_worker": 1}),
            "ddp_w2": ({}, {"workers": 2, "mode": "ddp", "num_cpus_per_worker": 1})}
"""name -> (train fields, parallel fields): the in-process loop with 1 or 2 processes, Ray rollout actors with a
Learner actor (W = 2), and ddp's Ray Train replicas (W = 1, 2); one torch thread per process everywhere."""
WARM_UP = 5
"""Episodes left out of the steady-state rate (Ray Train and actor start-up, first allocations)."""
SPLIT = ("rollout", "transfer", "update", "gradient", "allreduce", "step")


def _variant_config(setting: dict, episodes: int, train: dict, parallel: dict):
    return config_from_dict({**setting, "train": {**setting["train"], **train, "episodes": WARM_UP + episodes,
                                                  "threads": 1, "log_every": 1, "checkpoint_every": 10**6,
                                                  "progress_seconds": 0},
                             "parallel": parallel, "eval": {"n_samples": 64, "batches": 2},
                             "tracking": {"wandb": False}})


def _steady_state(rows: list[dict]) -> dict:
    """Episodes/s over the rows after WARM_UP (each row one episode's backend step), the mean time split in ms, and
    the bytes the backend reported moving per update."""
    steady = [row for row in rows if row["episode"] > WARM_UP]
    def mean(key: str) -> float:
        values = [row[key] for row in steady if row.get(key) is not None]
        return statistics.fmean(values) if values else 0.0
    return {"episodes_per_s": len(steady) / sum(row["time/episode_s"] for row in steady),
            "split_ms": {key: 1e3 * mean(f"time/{key}_s") for key in SPLIT if mean(f"time/{key}_s")},
            "bytes_per_update": mean("parallel/bytes_allreduced") or mean("parallel/bytes_per_update")}


def bench_parallel(rounds: int, episodes: Optional[int], settings: Sequence[str] = tuple(SETTINGS)) -> dict:
    """Steady-state episodes/s of every VARIANTS entry on each setting, alternated in rounds (the same work each:
    WARM_UP + episodes full distq train runs in one local Ray instance of this machine's cores), with ratios to
    in-process one process; plus the gloo all-reduce cost per byte (the scaling model's A) and Ray's own floor."""
    import tempfile

    import ray

    from distq.training.trainer import train

    load_before = os.getloadavg()
    connect_ray("local", 0.0, os.cpu_count())  # as `distq train` starts Ray (its workers' environment too)
    results = {}
    try:
        for setting_name in settings:
            setting, default_episodes, description = SETTINGS[setting_name]
            count = episodes or default_episodes
            runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
            for _ in range(rounds):
                for name, (train_fields, parallel_fields) in VARIANTS.items():
                    config = _variant_config(setting, count, train_fields, parallel_fields)
                    with tempfile.TemporaryDirectory() as folder:
                        train(config, Path(folder) / "run", echo=lambda line: None)
                        runs[name].append(_steady_state(rundir.read_table_rows(Path(folder) / "run" / rundir.METRICS)))
                    print(f"{setting_name} {name}: {runs[name][-1]['episodes_per_s']:.2f} episodes/s", flush=True)
            median = {name: statistics.median(r["episodes_per_s"] for r in rs) for name, rs in runs.items()}
            results[setting_name] = {
                "setting": description, "episodes_per_variant_per_round": count, "warm_up_episodes": WARM_UP,
                "episodes_per_s_median": median,
                "episodes_per_s_rounds": {name: [r["episodes_per_s"] for r in rs] for name, rs in runs.items()},
                "ratio_vs_in_process": {name: median[name] / median["in_process"] for name in VARIANTS},
                "ratio_ddp_w2_vs_processes2": median["ddp_w2"] / median["processes2"],
                "time_split_ms_mean": {name: {key: statistics.fmean(r["split_ms"].get(key, 0.0) for r in rs)
                                              for key in SPLIT} for name, rs in runs.items()},
                "bytes_per_update": {name: rs[0]["bytes_per_update"] for name, rs in runs.items()}}
        allreduce = _allreduce_cost()
        floor = _ray_floor()
    finally:
        ray.shutdown()
    for result in results.values():
        result["scaling_model"] = scaling_model(result, allreduce)
    return {"settings": results, "allreduce": allreduce, "ray_floor_ms": floor,
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]}


NETWORK = {"latency_s": 50e-6, "seconds_per_byte": 1 / 1.25e9}
"""Across nodes: an ASSUMED 10 Gbit/s Ethernet with 50 us per message (not measured here; one machine has no
network). Replace with a cluster's own measured figures."""


def allreduce_seconds(workers: int, nbytes: float, latency_s: float, seconds_per_byte: float) -> float:
    """A(W, bytes) of a ring all-reduce: 2 (W - 1) messages, each worker sending 2 (W - 1) / W of the buffer."""
    return 2 * (workers - 1) * latency_s + 2 * (workers - 1) / workers * nbytes * seconds_per_byte


def scaling_model(result: dict, allreduce: dict, largest: int = 4096) -> dict:
    """Time per update = (R + U) / W + A(W, bytes) + O, from one setting's measurements: R + U the in-process
    episode, O what a ddp replica adds beyond it and its all-reduce (ddp W = 1's episode minus in-process's), A
    the ring all-reduce of the gradients with the measured one-node cost (its W = 2 fit taken per message and per
    byte) or the assumed NETWORK across nodes. -> predicted speedups over in-process for W = 2, 4, 16, 64 and the
    W beyond which another worker no longer pays (the speedup's peak)."""
    work = 1 / result["episodes_per_s_median"]["in_process"]
    overhead = max(1 / result["episodes_per_s_median"]["ddp_w1"] - work, 0.0)
    nbytes = result["bytes_per_update"]["ddp_w2"]
    # one all_reduce of W = 2 on one node is one exchange each way: its fitted latency and per-byte cost
    one_node = {"latency_s": allreduce["latency_s"] / 2, "seconds_per_byte": allreduce["seconds_per_byte"]}

    def speedup(workers: int, link: dict) -> float:
        return work / (work / workers + allreduce_seconds(workers, nbytes, **link) + overhead)

    model = {"R_plus_U_ms": 1e3 * work, "O_ms": 1e3 * overhead, "gradient_bytes": nbytes}
    for name, link in (("one_node", one_node), ("across_nodes_assumed_10gbit", NETWORK)):
        model[name] = {"speedup": {str(w): speedup(w, link) for w in (2, 4, 16, 64)},
                       "A_ms": {str(w): 1e3 * allreduce_seconds(w, nbytes, **link) for w in (2, 4, 16, 64)},
                       "stops_paying_at_W": max(range(1, largest + 1), key=lambda w: speedup(w, link))}
    return model


def _allreduce_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    times = {}
    for numel in config["sizes"]:
        flat = torch.zeros(numel)
        for _ in range(5):
            dist.all_reduce(flat)
        dist.barrier()
        samples = []
        for _ in range(config["repeats"]):
            began = time.perf_counter()
            dist.all_reduce(flat)
            samples.append(time.perf_counter() - began)
        times[str(numel * 4)] = statistics.median(samples)
    if ray.train.get_context().get_world_rank() == 0:  # the workers share this machine's file system
        Path(config["out"]).write_text(json.dumps(times))


def _allreduce_cost(sizes=(1_024, 16_384, 262_144, 1_048_576, 4_194_304), repeats: int = 30) -> dict:
    """Median gloo all_reduce time of float32 buffers between 2 Ray Train workers on this machine, and its
    least-squares fit time = latency + bytes x seconds_per_byte (the scaling model's A for W = 2 on one node)."""
    import tempfile

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "times.json"
        TorchTrainer(_allreduce_worker, train_loop_config={"sizes": list(sizes), "repeats": repeats, "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
        times = {int(k): v for k, v in json.loads(out.read_text()).items()}
    xs, ys = list(times), list(times.values())
    slope = statistics.covariance(xs, ys) / statistics.variance(xs)
    return {"seconds_by_bytes": times, "latency_s": statistics.fmean(ys) - slope * statistics.fmean(xs),
            "seconds_per_byte": slope, "workers": 2, "backend": "gloo, one node (loopback)"}


def bench_rllib(rounds: int, timesteps: int) -> dict:
    """Environment steps per second at paper scale: distq's batched rollout (B = 300 trajectories of K = 20 steps,
    policy forward, exploration noise and ratio rewards included) against the same MDP (distq.edges.rllib_env) stepped
    by RLlib's SingleAgentEnvRunner with random actions (no policy at all), 1 and 8 env copies per runner."""
    import logging

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from distq.edges.rllib_env import register

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
