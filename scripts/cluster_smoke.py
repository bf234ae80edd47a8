"""`make cluster-smoke` (as root): cluster/local.yaml launched against this machine over ssh, the smoke sweep on it.

An unprivileged user `distqsmoke` (fresh HOME in a temporary directory) is the head's ssh user, behind an ssh server
of our own on 127.0.0.1 only; the cluster file is local.yaml with head 127.0.0.1, no workers and the head's ports and
temp dir our own. `ray up -y`, `ray submit CLUSTER scripts/tune.py`, checks through `ray exec`, `distq sample` on the
best trial, the dashboard through `ray dashboard`'s port-forward with the token, `ray down -y`. Everything on the
head runs as that user, so the `ray stop` of ray up and ray down cannot touch the machine's other Ray instances.
Whatever happens, the ssh server is stopped by its pid and the user, its processes and the temporary files go.
docs/sweeps.md ("Clusters") says what this covers and what only a cloud account can.

Over 300 lines: one script from setup to teardown (user, ssh server, cluster file, the Ray CLI steps, checks,
cleanup), whose cleanup must see everything the setup made.
"""
from __future__ import annotations

import contextlib
import copy
import getpass
import hashlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]

USER = "distqsmoke"
CLUSTER_NAME = "distq-smoke"
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync", "nc": "netcat-openbsd"}
EXPERIMENT = "~/runs/tune/smoke"  # tuning/smoke.yaml's name under its default storage, from the head's HOME
RAY_PORTS = ("port", "dashboard-port", "ray-client-server-port", "object-manager-port", "node-manager-port",
             "metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port")
RAY = str(Path(sys.executable).parent / "ray")
STEP_TIMEOUT_S = 900
BUDGET_S = 600


def free_ports(count: int) -> list[int]:
    """Ports no process listens on right now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def head_start_commands(commands: list[str], ports: dict[str, int], temp_dir: str) -> list[str]:
    """The cluster file's head start commands with the head's ports and temp dir our own (workers on random ports)."""
    own = " ".join(f"--{name}={port}" for name, port in ports.items() if name != "port")
    own += f" --min-worker-port=0 --max-worker-port=0 --temp-dir={temp_dir}"
    started = [i for i, c in enumerate(commands) if "ray start --head" in c]
    if len(started) != 1 or not re.search(r"--port=\d+", commands[started[0]]):
        raise ValueError("expected one `ray start --head ... --port=N` among head_start_ray_commands")
    changed = list(commands)
    changed[started[0]] = re.sub(r"--port=\d+", f"--port={ports['port']} {own}", commands[started[0]])
    return changed


def smoke_cluster(local: dict, key: Path, ssh_port: int, ports: dict[str, int], temp_dir: str) -> dict:
    """cluster/local.yaml pointed at this machine: head 127.0.0.1 reached through our sshd's port as USER, no
    workers; its file mounts, excludes and setup commands as they are, its head start commands on our own ports."""
    config = copy.deepcopy(local)
    config["cluster_name"] = CLUSTER_NAME
    config["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    # Ray's ssh command takes no port option; a ProxyCommand reaches our sshd on its own port.
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key),
                      "ssh_proxy_command": f"nc 127.0.0.1 {ssh_port}"}
    config["head_start_ray_commands"] = head_start_commands(local["head_start_ray_commands"], ports, temp_dir)
    return config


def ssh_control_dir() -> Path:
    """Where Ray's ssh client keeps this cluster's shared connections (as command_runner.SSHCommandRunner names it)."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{user}") / hashlib.sha256(CLUSTER_NAME.encode()).hexdigest()[:10]


def run(command: list[str], timeout: float = STEP_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    kwargs.setdefault("check", True)
    return subprocess.run(command, timeout=timeout, **kwargs)


def install_packages() -> None:
    missing = sorted({package for tool, package in PACKAGES.items() if not shutil.which(tool)})
    if missing:
        run(["apt-get", "update", "-q"])
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def add_user(home: Path) -> bool:
    """USER with HOME `home`, login by key only; True if this call created the user."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-p", "*", USER])  # '*': no password, not locked
        return True
    kill_user_processes()  # a previous run's leftovers: usermod refuses a user with processes
    run(["usermod", "-d", str(home), "-s", "/bin/bash", "-p", "*", USER])
    return False


def make_home(home: Path) -> None:
    """The login shells of ray up/exec/down read .profile and .bashrc. The temp dir: `ray stop` (ray up's, ray
    down's) resets the address file in its own, which must not be /tmp/ray of the machine's other Ray instances.
    pip: the head's pip looks where this machine's pip does (the local wheel of torch, the local indexes)."""
    (home / ".ssh").mkdir(parents=True)
    (home / "tmp").mkdir()
    (home / ".profile").write_text(". ~/.bashrc\n")
    pip_env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(os.environ.items()) if k.startswith("PIP_"))
    (home / ".bashrc").write_text(f"export TMPDIR=~/tmp RAY_TMPDIR=~/tmp\n{pip_env}")
    user_pip = Path("~/.config/pip/pip.conf").expanduser()
    if user_pip.is_file():
        (home / ".config" / "pip").mkdir(parents=True)
        shutil.copy(user_pip, home / ".config" / "pip" / "pip.conf")
    run(["chown", "-R", f"{USER}:{USER}", str(home)])


def kill_user_processes() -> None:
    """Every process of USER (ours alone: no other Ray instance runs as this user)."""
    left = subprocess.run(["pgrep", "-a", "-u", USER], capture_output=True, text=True).stdout
    if left:
        print(f"processes of {USER} still running (killed now):\n{left}", flush=True)
    for sig in ("TERM", "KILL"):
        subprocess.run(["pkill", f"-{sig}", "-u", USER], check=False)
        time.sleep(1)


def start_sshd(work: Path, home: Path) -> tuple[subprocess.Popen, int, Path]:
    """An ssh server on 127.0.0.1 only, with its own host key, config and port; USER logs in with a fresh key.
    Returns it (the caller stops it), its port and the key."""
    work.mkdir()
    for name in ("host_key", "user_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", CLUSTER_NAME, "-f", str(work / name)])
    shutil.copy(work / "user_key.pub", home / ".ssh" / "authorized_keys")
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    run(["chown", "-R", f"{USER}:{USER}", str(home / ".ssh")])
    port = free_ports(1)[0]
    (work / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host_key'}\nPidFile {work / 'sshd.pid'}\n"
        f"AllowUsers {USER}\nPermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nUsePAM no\nX11Forwarding no\nSubsystem sftp internal-sftp\n")
    with open(work / "sshd.log", "w") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")],
                                stdout=log, stderr=log, start_new_session=True)
    return sshd, port, work / "user_key"


def wait_for_sshd(sshd: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sshd.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"sshd did not start: {log.read_text()}")


def stop_sshd(sshd: subprocess.Popen) -> None:
    """The server and its per-connection children (they outlive the listener otherwise), by pid."""
    import psutil
    try:
        processes = [*psutil.Process(sshd.pid).children(recursive=True), psutil.Process(sshd.pid)]
    except psutil.NoSuchProcess:
        processes = []
    for p in processes:
        p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for p in alive:
        p.kill()
    sshd.wait(timeout=5)


class Smoke:
    """The ray CLI against the smoke cluster file, from the repository root (file_mounts upload "." from there)."""

    def __init__(self, cluster: Path, launcher_tmp: Path, work: Path, dashboard_port: int):
        self.cluster, self.work, self.dashboard_port = str(cluster), work, dashboard_port
        # ray up keeps the local provider's cluster state and its config cache in the temp dir: ours, not /tmp/ray.
        self.env = {**os.environ, "TMPDIR": str(launcher_tmp), "RAY_TMPDIR": str(launcher_tmp),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.times: dict[str, float] = {}

    def ray(self, step: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        start = time.monotonic()
        try:
            return run([RAY, args[0], self.cluster, *args[1:]], cwd=ROOT, env=self.env, **kwargs)
        finally:
            self.times[step] = time.monotonic() - start

    def check(self, step: str, command: str) -> str:
        """A shell command on the head (`ray exec` exits non-zero when it fails); its output."""
        out = self.ray(step, "exec", command, capture_output=True, text=True, check=False)
        print(out.stdout, out.stderr, sep="", flush=True)
        if out.returncode != 0:
            raise RuntimeError(f"{step} failed on the head: {command}")
        return out.stdout

    def best_run_dir(self) -> str:
        """The best trial's run directory on the head (its last Tune checkpoint), as `distq tune` chose it."""
        from distq.edges.sweep import load_sweep
        from distq.edges.tuning import best_row  # imports Ray Tune: only here, so the tests import this file quickly
        results = self.work / "results.parquet"
        self.ray("rsync-down results", "rsync-down", f"{EXPERIMENT}/results.parquet", str(results))
        rows = pq.read_table(results).to_pylist()
        best = best_row(rows, load_sweep(ROOT / "tuning" / "smoke.yaml"))
        if best is None or not best["checkpoint"]:
            raise RuntimeError(f"no finished trial with a checkpoint in {EXPERIMENT}/results.parquet")
        return best["checkpoint"]

    def dashboard(self) -> None:
        """`ray dashboard CLUSTER` forwards a local port to the head's dashboard (which listens on its localhost only);
        the dashboard answers 401 without the cluster's token and 200 with it."""
        printed = self.check("token", "echo TOKEN=$(ray get-auth-token 2> /dev/null)")
        token = re.search(r"^TOKEN=(\w+)", printed, re.M).group(1)  # the smoke cluster's own, made by ray up
        local = free_ports(1)[0]
        start = time.monotonic()
        command = [RAY, "dashboard", self.cluster, "--port", str(local), "--remote-port", str(self.dashboard_port)]
        print("+", " ".join(command), flush=True)
        forward = subprocess.Popen(command, cwd=ROOT, env=self.env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{local}/api/version"
            while _status(url) is None and time.monotonic() - start < 60:
                time.sleep(1)
            anonymous, authorised = _status(url), _status(url, {"Authorization": f"Bearer {token}"})
            print(f"dashboard through the port-forward: HTTP {anonymous} without the token, {authorised} with it")
            if (anonymous, authorised) != (401, 200):
                raise RuntimeError("the dashboard did not answer 401 without the token and 200 with it")
            run([RAY, "job", "list", "--address", f"http://127.0.0.1:{local}"], timeout=60,
                env={**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        finally:
            os.killpg(forward.pid, signal.SIGTERM)  # its own session: ray and the ssh -L it started
            forward.wait(timeout=10)
            self.times["dashboard"] = time.monotonic() - start


def _status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status of a GET (None: nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def smoke(smoke: Smoke) -> None:
    smoke.ray("ray up", "up", "-y")
    smoke.check("file_mounts", "cd ~/src/distq && test -f pyproject.toml && test ! -e .venv && test ! -e .git "
                               "&& test ! -e runs")
    smoke.ray("ray submit", "submit", "scripts/tune.py")
    smoke.check("outputs", f"cd {EXPERIMENT} && test -s results.parquet && test -s best.yaml && test -s pareto.png "
                           "&& ls -d */wandb/offline-run-*")
    run_dir = smoke.best_run_dir()
    smoke.check("distq sample", f"distq sample {run_dir} -n 100 --out ~/smoke-samples.parquet "
                                "&& test -s ~/smoke-samples.parquet")
    smoke.dashboard()


def remove_ssh_control_dir() -> None:
    shutil.rmtree(ssh_control_dir(), ignore_errors=True)
    with contextlib.suppress(OSError):
        ssh_control_dir().parent.rmdir()  # only if no other cluster of this user has connections there


def launch(cleanup: contextlib.ExitStack) -> Smoke:
    """User, ssh server and cluster file, each undone by `cleanup` whatever happens later (in reverse order)."""
    work = Path(tempfile.mkdtemp(prefix="distq-smoke-"))
    cleanup.callback(shutil.rmtree, work, ignore_errors=True)
    work.chmod(0o755)  # the smoke user's HOME lies inside
    home = work / "home"
    if add_user(home):
        cleanup.callback(run, ["userdel", USER])
    cleanup.callback(kill_user_processes)
    make_home(home)
    if not Path("/run/sshd").exists():  # sshd's privilege separation directory
        Path("/run/sshd").mkdir(mode=0o755)
        cleanup.callback(shutil.rmtree, "/run/sshd", ignore_errors=True)
    cleanup.callback(remove_ssh_control_dir)
    sshd, ssh_port, key = start_sshd(work / "sshd", home)
    cleanup.callback(stop_sshd, sshd)
    wait_for_sshd(sshd, ssh_port, work / "sshd" / "sshd.log")
    ports = dict(zip(RAY_PORTS, free_ports(len(RAY_PORTS))))
    local = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config = smoke_cluster(local, key, ssh_port, ports, f"{home}/tmp/ray")
    (work / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "launcher").mkdir()
    smoke_run = Smoke(work / "cluster.yaml", work / "launcher", work, ports["dashboard-port"])
    cleanup.callback(smoke_run.ray, "ray down", "down", "-y", check=False)
    return smoke_run


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("cluster_smoke.py runs as root: it installs packages, adds a user and starts an ssh server")
    started = time.monotonic()
    install_packages()
    with contextlib.ExitStack() as cleanup:
        smoke_run = launch(cleanup)
        smoke(smoke_run)
    total = time.monotonic() - started
    for step, seconds in smoke_run.times.items():
        print(f"{step:>20}: {seconds:6.1f} s")
    budget = "" if total <= BUDGET_S else f", over the budget of {BUDGET_S / 60:.0f} min"
    print(f"cluster smoke run passed in {total:.0f} s ({total / 60:.1f} min{budget})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
