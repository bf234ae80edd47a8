"""cluster/*.yaml: Ray's own cluster-config schema accepts both launcher files (checked offline); the cloud file
installs and starts what the smoke run (`make cluster-smoke`, scripts/cluster_smoke.py) proves on cluster/local.yaml;
the smoke run's cluster file is local.yaml's own, with only the head, the ssh login and the head's ports changed."""
import importlib.util
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


def _smoke_script():
    spec = importlib.util.spec_from_file_location("cluster_smoke", ROOT / "scripts" / "cluster_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _validate(config: dict) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(config))  # fills the provider's defaults, no network


def test_both_cluster_files_exist():
    assert {p.name for p in CLUSTERS} >= {"gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.name for p in CLUSTERS])
def test_cluster_config_passes_rays_schema(path):
    _validate(yaml.safe_load(path.read_text()))


def test_smoke_cluster_is_local_yaml_with_its_own_head_and_ports():
    smoke = _smoke_script()
    local = _load("local.yaml")
    ports = dict(zip(smoke.RAY_PORTS, range(41000, 41000 + len(smoke.RAY_PORTS))))
    config = smoke.smoke_cluster(local, Path("/tmp/key"), 2222, ports, "/home/x/tmp/ray")
    _validate(config)
    assert {k: config[k] for k in SHARED} == {k: local[k] for k in SHARED}  # the same setup, not a copy of it
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert config["auth"]["ssh_user"] == smoke.USER and "2222" in config["auth"]["ssh_proxy_command"]
    before, after = local["head_start_ray_commands"], config["head_start_ray_commands"]
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(before) == len(after) and len(changed) == 1
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", changed[0][1]))
    assert {name: int(flags[name]) for name in smoke.RAY_PORTS} == ports
    assert flags["temp-dir"] == "/home/x/tmp/ray"
    assert changed[0][1].split("--port=")[0] == changed[0][0].split("--port=")[0]  # the same command otherwise


def test_smoke_cluster_needs_a_head_start_with_a_port():
    smoke = _smoke_script()
    with pytest.raises(ValueError, match="--port"):
        smoke.head_start_commands(["ray stop", "ray start --head"], {"port": 1}, "/tmp/ray")


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


def _cluster_nodes(config: dict) -> list[dict[str, float]]:
    """The resources of every node of a cluster file at its largest: the head, and each worker type's max_workers."""
    nodes = []
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node_type["max_workers"]
        nodes += [dict(node_type["resources"]) for _ in range(count)]
    return nodes


def _packs(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether the bundles (each on one node, as Ray places a placement group's bundle) fit the nodes: first fit,
    largest bundles first."""
    free = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in bundle.items())), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] -= v
    return True


def test_the_packing_check_can_fail():
    nodes = [{"CPU": 8}, {"CPU": 4, "GPU": 1}]
    assert _packs([{"CPU": 4, "GPU": 1}, {"CPU": 8}], nodes)
    assert not _packs([{"CPU": 1, "GPU": 2}], nodes) and not _packs([{"CPU": 5, "GPU": 1}], nodes)
    assert not _packs([{"CPU": 6}] * 2, nodes)


def test_gpu_cluster_is_aws_with_a_cpu_head_and_autoscaled_gpu_workers():
    config = _load("gpu.yaml")
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c"))  # general purpose / compute: no GPU
    assert "GPU" not in head["resources"]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 and w["resources"]["GPU"] >= 1 for w in workers)


@pytest.mark.parametrize("path", sorted((ROOT / "tuning").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweeps_trials_fit_the_gpu_cluster(path):
    """A trial's placement group (distq.edges.tuning.trial_resources: its process, and a Learner and RolloutWorkers when it
    trains on actors) must fit gpu.yaml's nodes, each bundle on one node, or the sweep waits for ever there. Memory
    reservations are left out (every node type has at least 16 GiB)."""
    tuning = pytest.importorskip("distq.edges.tuning")
    from distq.edges.sweep import load_sweep

    sweep = load_sweep(path)
    # each numeric searched value at its largest (resources grow with them)
    trial = {dim.path: tuning._largest(sweep, dim.path) for dim in sweep.search_space
             if all(isinstance(v, (int, float)) for v in dim.values)}
    bundles = [{k: v for k, v in b.items() if k != "memory"}
               for b in tuning.trial_resources(sweep)(trial).bundles]
    assert _packs(bundles, _cluster_nodes(_load("gpu.yaml"))), bundles


def test_the_gpu_training_config_fits_the_gpu_cluster():
    """configs/swiss_roll_gpu.yaml, the run gpu.yaml's header shows: its Learner actor's GPU and CPUs on one GPU
    worker, its rollout actors' CPUs anywhere in the cluster."""
    from distq.setup.configfile import load_config

    parallel = load_config(ROOT / "configs" / "swiss_roll_gpu.yaml").parallel
    learner = {"CPU": parallel.learner_num_cpus, "GPU": parallel.learner_num_gpus}
    worker = {"CPU": parallel.num_cpus_per_worker, "GPU": parallel.num_gpus_per_worker}
    bundles = [{k: v for k, v in b.items() if v > 0} for b in [learner] + [worker] * parallel.workers]
    assert learner["GPU"] >= 1 and _packs(bundles, _cluster_nodes(_load("gpu.yaml")))
    assert "configs/swiss_roll_gpu.yaml" in (ROOT / "cluster" / "gpu.yaml").read_text()
