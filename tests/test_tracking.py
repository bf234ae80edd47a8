"""distq.runs.tracking: `distq train` writes one offline W&B run (no key, no network) with the config, every metrics
row at its episode, the plots and the summary; read back from the .wandb file by a reader of its own (the LevelDB
log format W&B writes: a 7-byte header, then 32 KiB blocks of records with a 7-byte header each)."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distq.edges.cli import main

pytestmark = pytest.mark.plots  # its runs draw their PNGs (conftest: elsewhere they skip them)

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, FULL, LAST = 32768, 1, 4


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-padded tail
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _tiny_config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "gaussian", "mean": [0.0], "std": 1.0, "n_samples": 64},
        "reward": {"fn": "linear", "coef": [1.0]}, "sde": {"T": 5.0, "dt": 0.5},
        "train": {"beta": 1.0, "episodes": 6, "batch_size": 16, "chunk_size": 16, "log_every": 2},
        "eval": {"n_samples": 32, "batches": 2, "every": 3}, **extra}))
    return path


@pytest.mark.slow
def test_distq_train_writes_an_offline_wandb_run_with_its_history(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    assert main(["train", str(_tiny_config(tmp_path, tracking={"project": "p", "group": "g"})),
                 "--out", str(run)]) == 0
    (offline,) = (run / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(offline.glob("*.wandb"))))
    # written out when main returns: the run's exit record, written after all its others, is in the file
    assert "exit" in {record.WhichOneof("record_type") for record in records}
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    # every metrics row at its episode (rows 2, 3 (an evaluation), 4, 6), with the same numbers
    assert sorted(history) == [row["episode"] for row in rows] == [2, 3, 4, 6]
    for row in rows:
        for key in ("loss/td", "reward/terminal_mean", "eval/kl_mean"):
            if row.get(key) is not None:
                assert history[row["episode"]][key] == pytest.approx(row[key])
    assert "eval/kl_mean" in history[3] and "eval/kl_mean" not in history[4]
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run_record.project, run_record.run_group) == ("p", "g")
    logged = {_key(i): json.loads(i.value_json) for i in run_record.config.update}
    assert logged["train"]["beta"] == 1.0 and logged["eval"]["every"] == 3
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update if _key(i)})
    expected = json.loads((run / "summary.json").read_text())
    assert summary["reward_mean"] == pytest.approx(expected["reward_mean"]) and summary["episodes"] == 6
    images = {p.name.split("_")[0] for p in (offline / "files" / "media" / "images").glob("*.png")}
    assert images == {"samples", "training"}


@pytest.mark.slow
def test_tracking_off_writes_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert main(["train", str(_tiny_config(tmp_path)), "--out", str(run), "--set", "tracking.wandb=false"]) == 0
    assert (run / "summary.json").is_file() and not (run / "wandb").exists()


def test_a_bad_tracking_mode_is_one_line(tmp_path, capsys):
    assert main(["train", str(_tiny_config(tmp_path)), "--out", str(tmp_path / "run"),
                 "--set", "tracking.mode=cloud"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tracking.mode" in err and "offline" in err
