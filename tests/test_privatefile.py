"""The one safe regular-file read (forge.privatefile): what it refuses, on real files."""

from __future__ import annotations

import os
from pathlib import Path

from forge.privatefile import read_private, read_trusted, trusted_dir


def test_a_regular_file_of_ours_is_read_whole(tmp_path: Path) -> None:
    f = tmp_path / "ok"
    f.write_bytes(b"x" * 100)
    f.chmod(0o600)
    assert read_trusted(f, 100) == b"x" * 100


def test_a_symlink_a_fifo_and_a_directory_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo", 0o600)  # opening must not block on it
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir", "missing"):
        assert read_trusted(tmp_path / name, 100) is None, name


def test_over_the_cap_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "big"
    f.write_bytes(b"x" * 101)
    f.chmod(0o600)
    assert read_trusted(f, 100) is None
    assert read_trusted(f, 101) == b"x" * 101


def test_a_file_others_may_write_is_refused_unless_allowed(tmp_path: Path) -> None:
    f = tmp_path / "shared"
    f.write_bytes(b"data")
    f.chmod(0o662)
    assert read_trusted(f, 100) is None
    assert read_trusted(f, 100, writable_by_others=True) == b"data"


def test_another_owner_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "theirs"
    f.write_bytes(b"data")
    f.chmod(0o600)
    assert read_trusted(f, 100, uid=os.getuid() + 1) is None


def test_read_private_needs_a_directory_only_we_can_write(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    f = d / "entry"
    f.write_bytes(b"data")
    f.chmod(0o600)
    assert trusted_dir(d) and read_private(f, 100) == b"data"
    d.chmod(0o777)
    assert not trusted_dir(d) and read_private(f, 100) is None
    d.chmod(0o700)
    (tmp_path / "via").symlink_to(d)
    assert not trusted_dir(tmp_path / "via") and read_private(tmp_path / "via" / "entry", 100) is None
