"""cluster/*.yaml: Ray's own cluster-config schema accepts both launcher files (checked offline), and they keep
the promises the README makes (code mounted, distq and torch installed, dashboard on localhost only)."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = sorted((ROOT / "cluster").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def test_both_cluster_files_exist():
    assert {p.name for p in CLUSTERS} >= {"gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_cluster_config_passes_rays_schema(path):
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(yaml.safe_load(path.read_text()))  # fills the provider's defaults, no network
    util.validate_config(config)


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_mounts_code_installs_distq_and_keeps_the_dashboard_local(name):
    config = _load(name)
    assert config["file_mounts"]["~/distq"] == "."
    setup = " ".join(config["setup_commands"])
    assert "pip install -e ~/distq" in setup and "torch==2.13.0" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert any("RAY_ADDRESS=auto" in c for c in config["head_setup_commands"])  # `ray submit` joins the cluster


def test_gpu_cluster_is_aws_with_a_cpu_head_and_autoscaled_gpu_workers():
    config = _load("gpu.yaml")
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c"))  # general purpose / compute: no GPU
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
    assert "--index-url" not in " ".join(config["setup_commands"])  # PyPI's Linux torch wheel is the CUDA build


def test_local_cluster_lists_its_machines():
    provider = _load("local.yaml")["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
