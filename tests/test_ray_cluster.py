"""distq.backends.ray_cluster: joining a cluster is a bounded wait that ends in one line (nothing listening, a stale address,
actors with no room, a refused token), and an embedded Ray that does not come up is one line from the CLI."""
import dataclasses
import socket

import pytest

ray = pytest.importorskip("ray")

from distq.backends import ray_actors as parallel  # noqa: E402
from distq.backends import ray_cluster
from distq.edges.cli import main  # noqa: E402
from distq.errors import DistqError  # noqa: E402
from distq.problems.data import load_dataset  # noqa: E402
from distq.setup.config import config_from_dict  # noqa: E402

TINY = {"data": {"source": "swiss_roll", "n_samples": 64}, "sde": {"dt": 0.5},
        "train": {"batch_size": 32, "chunk_size": 8, "episodes": 2, "processes": 1}}


def _closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_ray_yet(monkeypatch):
    """connect_ray as in a fresh process (the test session's own Ray may be up); it fails before ray.init here."""
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", lambda **kwargs: pytest.fail(f"ray.init({kwargs}) was called"))


def test_an_address_where_nothing_listens_fails_after_the_timeout_naming_it(no_ray_yet):
    port = _closed_port()
    with pytest.raises(DistqError, match=rf"no Ray cluster answers at 127.0.0.1:{port} .* after 0.5 s "
                                         r"\(parallel.connect_timeout_s\)"):
        ray_cluster.connect_ray(f"127.0.0.1:{port}", timeout_s=0.5)


def test_a_stale_ray_address_behind_auto_fails_the_same_way(no_ray_yet, monkeypatch):
    """A head that died leaves its address behind (RAY_ADDRESS, Ray's ray_current_cluster file): 'auto' finds it
    and would wait on it for minutes."""
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(DistqError, match=rf"no Ray cluster answers at \S+:{port} \(address 'auto'\)"):
        ray_cluster.connect_ray("auto", timeout_s=0.5)


@pytest.mark.parametrize("address", ["ray://head:10001", "head", "head:port"])
def test_malformed_addresses_are_one_line(no_ray_yet, address):
    with pytest.raises(DistqError, match="--address"):
        ray_cluster.connect_ray(address, timeout_s=0.5)


def test_a_refused_token_says_to_set_the_auth_mode_and_where_the_token_lives(monkeypatch, tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    message = ray_cluster._join_failure("10.0.0.5:6379", RuntimeError(
        "Failed to get cluster ID: Unauthenticated: InvalidAuthToken"))
    assert "set RAY_AUTH_MODE=token" in message and "~/.ray/auth_token" in message and str(token) in message
    assert "\n" not in message


def test_an_embedded_ray_that_does_not_start_is_one_line_from_the_cli(monkeypatch, tmp_path, capsys):
    def fail(**kwargs):
        raise RuntimeError("The node with node id abc timed out during startup.\nmore detail")

    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", fail)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {tmp_path / 'base.yaml'}\nsearch_space: {{train.beta: {{grid: [0, 1]}}}}\n"
                     f"report_every: 2\nstorage: {tmp_path / 'tune'}\ntracking: {{wandb: false}}\n")
    (tmp_path / "base.yaml").write_text("train: {episodes: 2, processes: 1}\n")
    assert main(["tune", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not start an embedded Ray instance" in err and "timed out" in err


@pytest.mark.parametrize("address", ["local", "auto"])
def test_the_job_starts_its_workers_with_one_malloc_arena_unless_the_user_set_one(monkeypatch, address):
    """Ray Train and Tune train in a thread of their workers; glibc gives such a thread an arena that returns its
    heaps to the OS (distq.setup.machine): every worker of the job is started with MALLOC_ARENA_MAX."""
    calls = []
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_cluster, "_resolve", lambda address: ("127.0.0.1", 1))
    monkeypatch.setattr(ray_cluster, "_wait_for_listener", lambda *args: None)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert ray_cluster.connect_ray(address, 1.0)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert ray_cluster.connect_ray(address, 1.0)
    assert [call["runtime_env"] for call in calls] == [{"env_vars": {"MALLOC_ARENA_MAX": "1"}},
                                                      {"env_vars": {"MALLOC_ARENA_MAX": "4"}}]


@pytest.mark.ray
def test_actors_the_cluster_has_no_room_for_fail_after_the_timeout_naming_the_fields(ray_session):
    config = config_from_dict({**TINY, "parallel": {"workers": 2, "num_cpus_per_worker": 8, "learner_num_cpus": 0.5,
                                                    "connect_timeout_s": 1}})
    dataset = load_dataset(config.data, config.seed)
    with pytest.raises(DistqError) as caught:
        parallel.RayBackend(config, dataset, None, None)
    message = str(caught.value)
    # the two workers can never be placed (the learner may not have started within the second either)
    assert "of 3 actors are not up" in message and "parallel.num_cpus_per_worker=8" in message
    assert "the cluster has 2 CPU" in message and "\n" not in message
    # the actors that waited were stopped: the session's CPUs are free again
    still = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, num_cpus_per_worker=0.5,
                                                                     connect_timeout_s=60))
    parallel.RayBackend(still, dataset, None, None).close()


def test_train_against_an_address_where_nothing_listens_is_one_line_and_writes_nothing(tmp_path):
    """The user's command, in a process of its own (this one may hold the test session's Ray)."""
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    config.write_text("train: {episodes: 2, processes: 1, batch_size: 32, chunk_size: 8}\n"
                      "parallel: {workers: 1, connect_timeout_s: 0.5}\n")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "distq.edges.cli", "train", str(config), "--out", str(run),
                           "--address", f"127.0.0.1:{_closed_port()}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("distq: error: no Ray cluster answers at ")
    assert not run.exists() or [p.name for p in run.iterdir()] == []
