"""distq.runs.checkpoint: a checksum catches a byte changed anywhere; files from before the checksum still load."""
import io

import pytest
import torch

from distq.errors import DistqError
from distq.runs.checkpoint import HEADER, load_checkpoint, save_checkpoint

PAYLOAD = {"config": {"seed": 0}, "episode": 3, "learner": {"policy": {"w": torch.arange(4096.0)}}, "columns": ["x0"]}


def flip(path, offset: int, count: int = 64) -> None:
    """Invert `count` bytes of a file from `offset` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", PAYLOAD)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["format"] == 2 and loaded["episode"] == 3
    assert torch.equal(loaded["learner"]["policy"]["w"], PAYLOAD["learner"]["policy"]["w"])
    assert (tmp_path / "c.pt").read_bytes().startswith(HEADER)


@pytest.mark.parametrize("offset", [len(HEADER), 100, 2000, 9000, -64])  # the digest, torch's zip records, the end
def test_flipped_bytes_anywhere_after_the_tag_are_a_checksum_mismatch(tmp_path, offset):
    path = tmp_path / "c.pt"
    save_checkpoint(path, PAYLOAD)
    flip(path, offset)
    with pytest.raises(DistqError, match=f"checkpoint {path} is corrupt \\(checksum mismatch\\)"):
        load_checkpoint(path)


def test_a_damaged_tag_or_a_truncated_file_is_corrupt(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, PAYLOAD)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DistqError, match="checksum mismatch"):
        load_checkpoint(path)
    path.write_bytes(b"X" + data[1:])
    with pytest.raises(DistqError, match=f"checkpoint {path} is corrupt or not a distq checkpoint"):
        load_checkpoint(path)


def test_format_1_files_without_a_checksum_still_load(tmp_path):
    """torch.save's bytes alone, as distq wrote them before the checksum."""
    torch.save({"format": 1, **PAYLOAD}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["episode"] == 3
    buffer = io.BytesIO()
    torch.save({"format": 2, **PAYLOAD}, buffer)  # a current payload stripped of its header
    (tmp_path / "stripped.pt").write_bytes(buffer.getvalue())
    with pytest.raises(DistqError, match="format 2 but no checksum header"):
        load_checkpoint(tmp_path / "stripped.pt")


def test_resume_accepts_changed_run_settings_and_names_any_other_changed_key(tmp_path):
    """distq.setup.config.run_settings (fields marked run_setting, and the parallel and tracking sections) may change on
    --resume; a key that defines the experiment, even an evaluation one (eval.pca), may not."""
    import dataclasses

    from distq.errors import DistqError
    from distq.runs.checkpoint import check_compatible, config_differences
    from distq.setup.config import config_from_dict, run_settings

    assert {"train.episodes", "train.device", "eval.batches", "parallel.mode", "tracking.project"} <= set(run_settings())
    assert not {"train.beta", "train.lr_policy", "eval.pca", "model.hidden", "seed"} & set(run_settings())
    saved = config_from_dict({}).to_dict()
    changed = config_from_dict({"train": {"episodes": 7, "device": "auto", "log_every": 3},
                                "eval": {"batches": 3}, "parallel": {"connect_timeout_s": 5.0},
                                "tracking": {"project": "other"}})
    assert config_differences(saved, changed) == []
    other = dataclasses.replace(changed, eval=dataclasses.replace(changed.eval, pca=4),
                                train=dataclasses.replace(changed.train, beta=2.0))
    assert config_differences(saved, other) == ["eval.pca", "train.beta"]
    with pytest.raises(DistqError, match=r"eval.pca \(checkpoint 0\), train.beta \(checkpoint 0.0\); only run "
                                         r"settings"):
        check_compatible({"config": saved}, other, tmp_path / "checkpoint.pt")
