"""Shared fixtures. `ray_session`: one local Ray instance for all tests marked `ray`, started on first use and
stopped at the end of the session (Ray's start-up costs seconds; code under test must neither re-init nor stop it)."""
import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
