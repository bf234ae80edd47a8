"""Every command the docs show runs as written on a fresh clone (slow): the shell blocks of README.md and docs/*.md,
and the command lines commented in cluster/*.yaml and tuning/*.yaml, in order, block by block, in one temporary
working directory holding the repository's configs/, tuning/ and scripts/ and the user files the docs assume.

Each command runs as printed, made small by flags appended after the doc's own (a later --set wins): a few
episodes, small batches and evaluations, a shrunken tuning/smoke.yaml. `ray start --head` becomes a head of our
own (a free port, its own temp dir and HOME, so other Ray instances and the user's ~/.ray are never touched) that
`ray stop` stops by its pid. The few commands that cannot run here are listed in SKIPPED with the reason; any
other command the test does not know how to run fails it. `distq` commands that join no cluster of their own run in
this process (`distq.edges.cli.main`, exit code and stderr checked as from the console script), their Ray ones on the test
session's shared instance: a fresh interpreter and Ray instance per command would take most of the suite's time.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.plots]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_INFO = ("", "sh", "bash", "shell", "console")
SKIPPED = {
    r"ray (up|submit|exec|dashboard|down) cluster/\w+\.yaml\b.*":
        "needs the cluster of cluster/*.yaml: AWS credentials (gpu.yaml) or ssh hosts (local.yaml)",
    r"distq train configs/swiss_roll_gpu\.yaml\b.*": "needs a CUDA GPU (its train.device is cuda); this machine has none",
    r"ray list actors": "shows the actors while a run trains (from a second terminal) and needs Ray's dashboard, "
                        "which the test's head runs without",
    r"make test": "runs the whole suite, this test included",
    r"make cluster-smoke": "installs system packages and an ssh server, adds a user; minutes",
    r'python -m pytest -m "not slow and not ray"': "runs the suite's fast part, which the suite runs anyway",
}
# train.processes=1: the critic process of the shipped configs' train.processes 2 gives the same numbers (tested in
# tests/test_two_process.py) and here would only add a second interpreter to every command
SMALL_RUN = ["--set", "train.batch_size=32", "--set", "train.chunk_size=16", "--set", "train.log_every=1",
             "--set", "eval.n_samples=32", "--set", "eval.batches=2", "--set", "train.processes=1"]
EPISODES, RESUME_EPISODES = 3, 5
SMALL_SWEEP = {"train.episodes": 4, "train.batch_size": 16, "train.chunk_size": 16, "data.n_samples": 64,
               "eval.n_samples": 32, "eval.batches": 2}
DEADLINE_S = 300


# ---- what the docs show -------------------------------------------------------------------------------------------

def _logical_lines(lines: list[str]) -> list[str]:
    """Lines with trailing-backslash continuations joined."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append(pending + line)
            pending = ""
    return joined


def markdown_blocks(path: Path) -> list[list[str]]:
    """The shell blocks of a Markdown file (fences with no language, or sh/bash/shell/console), as logical lines."""
    blocks, block, info = [], None, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, info = [], line[3:].strip()
            else:
                if info in SHELL_INFO:
                    blocks.append(_logical_lines(block))
                block = None
        elif block is not None:
            block.append(line)
    return blocks


def yaml_comment_block(path: Path) -> list[str]:
    """The command lines commented in a YAML file: `#` then two or more spaces then the command."""
    lines = [m.group(1) for m in (re.match(r"#\s{2,}(\S.*)", line) for line in path.read_text().splitlines()) if m]
    return _logical_lines(lines)


def doc_blocks() -> list[tuple[str, list[str]]]:
    """(where, logical lines) of every doc block, README first."""
    found = [(f"README.md block {i + 1}", b) for i, b in enumerate(markdown_blocks(ROOT / "README.md"))]
    for md in sorted((ROOT / "docs").glob("*.md")):
        found += [(f"{md.relative_to(ROOT)} block {i + 1}", b) for i, b in enumerate(markdown_blocks(md))]
    for config in sorted([*(ROOT / "cluster").glob("*.yaml"), *(ROOT / "tuning").glob("*.yaml")]):
        found.append((str(config.relative_to(ROOT)), yaml_comment_block(config)))
    return found


def commands(line: str) -> list[list[str]]:
    """The commands of one logical line (comments dropped, `&&` split), each without a leading `.venv/bin/`."""
    words = shlex.split(line, comments=True)
    found, command = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            if command:
                found.append(command)
            command = []
        elif command or not re.fullmatch(r"[A-Z_]+=\S*", word):  # environment assignments are not the command
            command.append(word.removeprefix(".venv/bin/"))
    return found


def skip_reason(command: list[str]) -> str | None:
    text = shlex.join(command).replace("'", '"')
    return next((reason for pattern, reason in SKIPPED.items() if re.fullmatch(pattern, text)), None)


# ---- the user's files the docs assume ---------------------------------------------------------------------------

def write_user_files(work: Path, lines: list[str]) -> None:
    """my_points.parquet (height, weight) and my_rewards.py: the functions whose content the docs give in a
    `# my_rewards.py: def ...: return ...` comment, and `taller` (the height, column 0), which they only name."""
    rng = np.random.default_rng(0)
    height, weight = rng.normal(170, 10, 200), rng.normal(70, 12, 200)
    pq.write_table(pa.table({"height": height, "weight": weight}), work / "my_points.parquet")
    functions = {"taller": "def taller(x):\n    return x[:, 0]\n"}
    for line in lines:
        given = re.match(r"# my_rewards\.py:\s+def (\w+)\((.*?)\):\s+(return .*?)(\s{2,}\(.*)?$", line)
        if given:
            functions[given.group(1)] = f"def {given.group(1)}({given.group(2)}):\n    {given.group(3)}\n"
    named = {m for line in lines for m in re.findall(r"my_rewards\.py:(\w+)", line.split("#")[0])}
    assert named <= set(functions), f"the docs name reward functions this test does not write: {named - set(functions)}"
    (work / "my_rewards.py").write_text("\n\n".join(functions.values()))


def shrink_sweeps(work: Path) -> None:
    """tuning/*.yaml of the working directory: the repository's, with a few episodes on a small problem."""
    for source in (ROOT / "tuning").glob("*.yaml"):
        sweep = yaml.safe_load(source.read_text())
        sweep["overrides"] = {**sweep.get("overrides", {}), **SMALL_SWEEP}
        sweep["report_every"] = 2
        sweep["search"]["num_samples"] = 1
        if sweep.get("scheduler", {}).get("name") == "asha":
            sweep["scheduler"]["grace_period"] = 2
        (work / "tuning" / source.name).write_text(yaml.safe_dump(sweep))


def make_workdir(work: Path, lines: list[str]) -> None:
    (work / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(ROOT / "scripts", work / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "tuning").mkdir()
    shrink_sweeps(work)
    for name in ("Makefile", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(ROOT / ".venv")
    write_user_files(work, lines)


# ---- running them ------------------------------------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayHead:
    """`ray start --head --block` of our own, stopped by its pid (never `ray stop`: it stops every Ray on the machine).

    Its temp dir is TMPDIR/ray, where `--address auto` looks (ray_current_cluster), as after a user's `ray start`."""

    def __init__(self, env: dict[str, str]):
        self.env, self.process = env, None

    @property
    def address_file(self) -> Path:
        return Path(self.env["TMPDIR"]) / "ray" / "ray_current_cluster"

    def start(self, doc_command: list[str]) -> None:
        assert self.process is None, "ray start --head twice without ray stop"
        assert doc_command[:3] == ["ray", "start", "--head"] and set(doc_command[3:]) <= {"--num-cpus=2"}, doc_command
        port, dashboard, client = _free_ports(3)  # the defaults (6379, 8265, 10001) may be another head's
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--temp-dir={Path(self.env['TMPDIR']) / 'ray'}", "--include-dashboard=false", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.address_file.is_file():
            assert self.process.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()  # `ray start --block` stops the head's processes on SIGTERM (about 3 s)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        try:  # anything of its session (start_new_session: one process group) still alive
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None
        self.address_file.unlink(missing_ok=True)  # as `ray stop` does: --address auto must not find a dead head


def make_recipe(target: str) -> list[str]:
    """The command of a Makefile target's last recipe line, $(BIN) as .venv/bin."""
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    [command] = commands(recipe.strip().splitlines()[-1].replace("$(BIN)/", ""))
    return command


class Runner:
    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env, self.head = work, env, RayHead(env)
        self.trained: set[str] = set()
        self.log: list[tuple[str, float]] = []

    def small(self, command: list[str]) -> list[str]:
        """The doc's command with flags that make it small appended."""
        tool, sub = command[0], command[1] if len(command) > 1 else ""
        if tool == "distq" and sub in ("train", "pretrain"):
            run = command[command.index("--resume") + 1] if "--resume" in command else None
            episodes = RESUME_EPISODES if run in self.trained else EPISODES
            if "--out" in command:
                self.trained.add(command[command.index("--out") + 1])
            return [*command, *SMALL_RUN, "--set", f"train.episodes={episodes}"]
        if tool == "distq" and sub == "sample":
            return [*command, "-n", "64"]
        if tool == "distq" and sub == "calibrate":  # any reward is within tolerance 1 of the target: one probe
            if "--target-kl" in command:  # any KL is within the budget 10^3 and within 10^6 of it: one probe
                return [*command, *SMALL_RUN, "--set", f"train.episodes={EPISODES}", "--target-kl", "1e3",
                        "--tolerance", "1e6"]
            return [*command, *SMALL_RUN, "--set", f"train.episodes={EPISODES}", "--tolerance", "1"]
        if tool == "python" and sub == "scripts/bench.py":
            return [*command, "--rounds", "1", "--episodes", "3"]
        return command  # distq evaluate (the run's small eval), distq tune and scripts/tune.py (tuning/ is small)

    def run(self, command: list[str]) -> str:
        tool, sub = command[0], command[1] if len(command) > 1 else ""
        if command[:2] == ["ray", "start"]:
            self.head.start(command)
            return "started"
        if command == ["ray", "stop"]:
            self.head.stop()
            return "stopped"
        if tool == "make" and sub in ("demo", "bench") and len(command) == 2:
            return self.run(make_recipe(sub))
        known = tool == "distq" or (tool == "python" and sub.startswith("scripts/"))
        assert known, f"the docs show a command this test does not know how to run: {shlex.join(command)}"
        if tool == "distq" and "--address" not in command:
            return self.in_process(self.small(command)[1:])
        executable = str(BIN / tool)
        done = subprocess.run([executable, *self.small(command)[1:]], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=DEADLINE_S)
        assert done.returncode == 0, (f"{shlex.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                                      f"{done.stderr[-3000:]}")
        assert "distq: error" not in done.stderr, done.stderr[-2000:]
        return done.stdout


    def in_process(self, argv: list[str]) -> str:
        from distq.edges.cli import main

        out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(self.work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        finally:
            os.chdir(cwd)
        assert code == 0, f"distq {shlex.join(argv)} exited {code}:\n{out.getvalue()[-2000:]}\n{err.getvalue()[-3000:]}"
        return out.getvalue()


@pytest.fixture
def runner(monkeypatch):
    work = Path(tempfile.mkdtemp(prefix="dqdocs"))  # short: Ray's socket paths live under TMPDIR
    (work / "home").mkdir()
    (work / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(HOME=str(work / "home"), TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    for key in [k for k in os.environ if k.startswith(("RAY_", "WANDB_"))]:  # the in-process commands see `env` too
        monkeypatch.delenv(key)
    for key in ("HOME", "WANDB_MODE"):
        monkeypatch.setenv(key, env[key])
    cwd = work / "clone"
    cwd.mkdir()
    runner = Runner(cwd, env)
    yield runner
    runner.head.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_doc_blocks_are_whole_commands():
    """No template syntax ([--flag ...], A|B) and no fragments: every line of a shell block is a real command."""
    for where, block in doc_blocks():
        for line in block:
            text = line.split(" #")[0].strip()
            if not text or text.startswith("#"):
                continue
            assert not re.search(r"\[--|\w\|\w|^--", text), f"{where}: not a runnable command: {line}"
            assert commands(line), f"{where}: no command in: {line}"


@pytest.mark.ray
def test_every_doc_command_runs(runner, ray_session):
    blocks = doc_blocks()
    make_workdir(runner.work, [line for _, block in blocks for line in block])
    skipped, ran = [], []
    for where, block in blocks:
        for line in block:
            for command in commands(line):
                reason = skip_reason(command)
                if reason:
                    skipped.append((shlex.join(command), reason))
                    continue
                began = time.monotonic()
                runner.run(command)
                ran.append((where, shlex.join(command), time.monotonic() - began))
                print(f"{ran[-1][2]:5.1f}s  {where}: {ran[-1][1]}", flush=True)
    assert runner.head.process is None, "a doc block starts a Ray head and never stops it"
    print("\n".join(f"skipped: {command} ({reason})" for command, reason in skipped))
    assert ran and all(reason for _, reason in skipped)


def test_the_python_example_runs(tmp_path, monkeypatch):
    """docs/usage.md's Python block, run in a copy of configs/ with 4 episodes, saving and evaluating every 2."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "usage.md").read_text(), re.DOTALL)
    assert len(blocks) == 1
    code = blocks[0]
    for full, small in (('"train.episodes=2000"', '"train.episodes=4", "eval.n_samples=50", "eval.batches=2"'),
                        ("% 500", "% 2")):
        assert full in code
        code = code.replace(full, small)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "docs/usage.md", "exec"), {"print": lambda *args: printed.append(args)})
    assert [episode for episode, _ in printed] == [2]
    assert json.loads((tmp_path / "runs" / "stepped" / "summary.json").read_text())["episodes"] == 4
    assert (tmp_path / "runs" / "stepped" / "samples.png").is_file()
