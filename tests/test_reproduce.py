"""scripts/reproduce.py on a tiny grid (slow): it writes the figures' and tables' markdown with the paper's numbers
beside distq's, says how short the runs were, copies the plots, and a second call trains nothing again."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_writes_tables_and_resumes(tmp_path, capsys):
    reproduce = _reproduce()
    argv = ["--episodes", "10", "--eval-batches", "2", "--out", str(tmp_path)]
    reproduce.main(argv)
    figure1, tables = (tmp_path / "figure1.md").read_text(), (tmp_path / "tables5_6.md").read_text()
    assert "QUICK: 10 episodes per run" in figure1 and "| 1 |" in figure1 and "0.982" in figure1
    assert "(0.14)" in tables and "(1.29)" in tables and "runs/swiss_roll_beta2.25" in tables
    assert (tmp_path / "figure3.md").read_text().count("\n| ") == 5
    assert all((tmp_path / f"figure3_beta{b}.png").is_file() for b in ("0", "1", "2.25", "4"))
    capsys.readouterr()
    reproduce.main(argv)
    assert capsys.readouterr().out.count("finished earlier, kept") == 7


def test_right_mode_mass_is_the_closed_form_tilt():
    reproduce = _reproduce()
    assert reproduce.right_mode_mass(0.0) == 0.5
    assert abs(reproduce.right_mode_mass(0.1) - 0.599) < 1e-3 and abs(reproduce.right_mode_mass(1.0) - 0.982) < 1e-3
