"""Outputs get the permissions the umask gives (not mkstemp's 0600 or mkdtemp's 0700)."""
from __future__ import annotations

import os
import stat

import pytest

from checkpoint_utils.output_dir import atomic_directory
from config.files import atomic_write_text, current_umask
from input.shards import write_json_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027          # still what the fixture set


def test_new_files_follow_the_umask_and_replaced_ones_keep_their_mode(tmp_path, umask_027):
    atomic_write_text(str(tmp_path / "params.yaml"), "a: 1\n")
    write_json_atomic(str(tmp_path / "stats.json"), {"examples": 3})
    assert _mode(tmp_path / "params.yaml") == _mode(tmp_path / "stats.json") == 0o640
    os.chmod(tmp_path / "params.yaml", 0o600)          # the user's choice survives a rewrite
    atomic_write_text(str(tmp_path / "params.yaml"), "a: 2\n")
    assert _mode(tmp_path / "params.yaml") == 0o600 and (tmp_path / "params.yaml").read_text() == "a: 2\n"
    assert sorted(os.listdir(tmp_path)) == ["params.yaml", "stats.json"]      # no temp files left


def test_atomic_directory_follows_the_umask_then_keeps_its_mode(tmp_path, umask_027):
    target = tmp_path / "out"
    with atomic_directory(str(target), lambda d: None, lambda name: False) as work:
        open(os.path.join(work, "config.json"), "w").close()
    assert _mode(target) == 0o750
    os.chmod(target, 0o700)
    with atomic_directory(str(target), lambda d: None, lambda name: False) as work:
        open(os.path.join(work, "config.json"), "w").close()
    assert _mode(target) == 0o700
