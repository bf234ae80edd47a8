"""cluster/*.yaml: Ray's own cluster-config schema accepts both launcher files (checked offline); the cloud file
installs and starts what cluster/local.yaml does."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = sorted((ROOT / "cluster").glob("*.yaml"))
SHARED = ("file_mounts", "rsync_exclude", "rsync_filter", "cluster_synced_files", "setup_commands",
          "head_setup_commands")


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def _validate(config: dict) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(config))  # fills the provider's defaults, no network


def test_both_cluster_files_exist():
    assert {p.name for p in CLUSTERS} >= {"gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_cluster_config_passes_rays_schema(path):
    _validate(yaml.safe_load(path.read_text()))


def test_gpu_cluster_installs_and_starts_what_the_smoke_run_proves():
    local, gpu = _load("local.yaml"), _load("gpu.yaml")
    assert {k: gpu[k] for k in SHARED} == {k: local[k] for k in SHARED}
    strip = re.compile(r" --(port|object-manager-port)=\d+")
    assert [strip.sub("", c) for c in gpu["head_start_ray_commands"]] == \
        [strip.sub("", c) for c in local["head_start_ray_commands"]]


def test_cluster_installs_torch_as_pinned_in_pyproject():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(p for p in pins if p.startswith("torch=="))
    installs = [c for c in _load("local.yaml")["setup_commands"] if re.search(r"pip install .*\btorch\b", c)]
    assert installs and all(c.split("pip install ", 1)[1].split() == [torch] for c in installs)


def test_the_mounted_checkout_does_not_shadow_the_installed_package(tmp_path):
    """`ray submit` copies the script to the head's HOME and runs it there (sys.path[0] = HOME): a checkout mounted
    at ~/distq there became an empty namespace package `distq` that hid the installed one."""
    for target in _load("local.yaml")["file_mounts"]:
        mounted = tmp_path / Path(target).relative_to("~")
        mounted.parent.mkdir(parents=True, exist_ok=True)
        mounted.symlink_to(ROOT)
    found = subprocess.run([sys.executable, "-c", "import distq; print(distq.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == str(ROOT / "distq" / "__init__.py")


def test_gpu_cluster_is_aws_with_a_cpu_head_and_autoscaled_gpu_workers():
    config = _load("gpu.yaml")
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c"))  # general purpose / compute: no GPU
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers)
