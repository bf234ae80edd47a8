"""distq.runs.rundir: the run directory's lock, its atomic writers on a failing disk, the space check, what counts as a run.

Tests run as root, where a read-only mode stops no write: failing disks are simulated by writers that raise.
"""
import errno
import os
import shutil
from collections import namedtuple

import pytest

from distq.errors import DistqError
from distq.runs import rundir


def test_a_second_holder_is_refused_naming_the_first_s_pid(tmp_path):
    run = tmp_path / "run"
    with rundir.locked(run, "--out"):
        assert (run / rundir.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(DistqError, match=f"in use by process {os.getpid()}"):
            with rundir.locked(run, "--out"):
                pass
    assert not (run / rundir.LOCK).exists()  # released and removed
    with rundir.locked(run, "--out"):
        pass


def test_a_lock_file_left_by_a_dead_process_blocks_nothing(tmp_path):
    (tmp_path / rundir.LOCK).write_text("999999\n")  # no process holds its flock
    with rundir.locked(tmp_path, "--out"):
        assert (tmp_path / rundir.LOCK).read_text().strip() == str(os.getpid())


def test_only_a_checkpoint_makes_a_directory_a_run(tmp_path):
    (tmp_path / rundir.CONFIG).write_text("seed: 0\n")  # left by a start that failed
    rundir.check_run_dir(tmp_path, resume=False, overwrite=False)
    (tmp_path / rundir.CHECKPOINT).write_bytes(b"x")
    with pytest.raises(DistqError, match="--overwrite"):
        rundir.check_run_dir(tmp_path, resume=False, overwrite=False)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "summary.json"
    rundir.write_json(path, {"old": 1})

    def fail(tmp):
        tmp.write_text("half")
        raise error

    with pytest.raises(DistqError, match=f"cannot write {path} \\({error.strerror}\\)"):
        rundir.atomic_write(path, fail)
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_space_check_refuses_a_full_disk_and_an_unwritable_directory(tmp_path, monkeypatch):
    rundir.check_space(tmp_path, 2**20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(DistqError, match=f"{tmp_path} has 1 MiB free; this run needs about 17 MiB"):
        rundir.check_space(tmp_path, 2**20)
    monkeypatch.undo()

    def read_only(self, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(type(tmp_path), "write_bytes", read_only)
    with pytest.raises(DistqError, match=f"cannot write in {tmp_path}: .*Permission denied"):
        rundir.check_space(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_target_that_is_not_a_regular_file_is_written_in_place_not_replaced(tmp_path):
    """A FIFO (as /dev/null, a device): renaming a temporary file over it would replace it with a regular file."""
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    rundir.write_json(fifo, {"a": 1})
    reader.join(timeout=30)
    assert received == [b'{\n  "a": 1\n}\n'] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary left beside it
