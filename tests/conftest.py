"""Shared fixtures. Every test runs torch on one thread. `ray_session`: one local Ray instance for all tests marked `ray`, started on first use and
stopped at the end of the session (Ray's start-up costs seconds; code under test must neither re-init nor stop it)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: OpenMP threads only add contention on a shared 2-core machine (as in distq's own default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
