import os

import pytest

from megatron_ext.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "out.txt"
    atomic_write(str(path), "one")
    atomic_write(str(path), b"two", fsync=True)
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["out.txt"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "out.npy"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path), suffix=".npy") as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".npy")
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.npy"]


def test_mode_is_what_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a"), "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o640


def test_unwritable_destinations_are_one_line_user_errors(tmp_path):
    from megatron_ext.errors import UserError
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    for path, message in ((a_file / "out.json", "cannot write there"), (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=message) as info:
            atomic_write(str(path), "x")
        assert "\n" not in str(info.value)
    assert a_file.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file"]
    if os.geteuid() != 0:                                              # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot write there"):
            atomic_write(str(locked / "out.json"), "x")
