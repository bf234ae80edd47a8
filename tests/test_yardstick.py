"""scripts/yardstick.py on the 1D mixture with a few episodes (slow): q-learning, weighted dsm and the perfect
learner side by side at each sampler, the runs with their effective sample sizes, and a second call trains nothing."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_yardstick_tables_each_method_at_each_sampler_and_resumes(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("yardstick", ROOT / "scripts" / "yardstick.py")
    yardstick = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "yardstick", yardstick)  # where its dataclass looks itself up
    spec.loader.exec_module(yardstick)
    argv = ["--problems", "gmm1d", "--quick", "--eval-batches", "2", "--out", str(tmp_path),
            "--episodes", "10", "--set", "eval.n_samples=200"]
    yardstick.main(argv)
    text = (tmp_path / "yardstick_quick.md").read_text()
    assert "QUICK" in text and "`configs/gmm1d.yaml`" in text and "logical CPUs" in text
    for cell in ("sde, 20 steps", "sde, 40 steps", "ddim, 5 steps"):
        for method in ("q-learning", "weighted dsm", "weighted dsm, q-learning's time", "perfect learner"):
            assert f"| {cell} | {method} |" in text, (cell, method)
    runs = {(m, float(b)): row for m, b, row in re.findall(
        r"\| (q-learning|weighted dsm|weighted dsm, q-learning's time|perfect learner) \| ([0-9.]+) \| (-?[0-9.]+ \+- .*)",
        text)}
    assert len(runs) == 16
    # weighted dsm reports its weights' ESS (1 to N = 300), q-learning has none
    assert re.search(r"\| \d+ of 300 \|$", runs[("weighted dsm", 1.5)]) and runs[("q-learning", 1.5)].endswith("| - |")
    # same updates: 10 episodes each; at q-learning's time, 10 episodes times the ratio of their measured rates
    episodes = {method: int(runs[(method, 1.5)].split(" | ")[-3].replace(",", ""))
                for method in ("q-learning", "weighted dsm", "weighted dsm, q-learning's time")}
    rates = {method: json.loads((tmp_path / "runs" / f"gmm1d_{method}_beta1.5" / "summary.json").read_text())
             ["episodes_per_s"] for method in ("qlearning", "dsm")}
    assert episodes["q-learning"] == episodes["weighted dsm"] == 10
    assert episodes["weighted dsm, q-learning's time"] == max(1, round(10 * rates["dsm"] / rates["qlearning"]))

    def perfect_reward(beta):
        return float(runs[("perfect learner", beta)].split(" +- ")[0])
    # the tilt's mean reward grows with beta: -6 at beta 0 towards 0 (algorithm.md section 12)
    assert perfect_reward(0.3) < perfect_reward(0.6) < perfect_reward(1.0) < perfect_reward(1.5) < -1
    capsys.readouterr()
    yardstick.main(argv)
    assert capsys.readouterr().out.count("finished earlier, kept") == 12
