"""The check behind conftest's ``tree_is_left_unchanged``: a snapshot of ``git status`` sees a
new file, a deleted file and a rewrite of a file that was already modified, and nothing else."""

import shutil
import subprocess

import pytest
import worktree


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "kept.txt").write_text("kept\n")
    (tmp_path / "edited.txt").write_text("committed\n")
    (tmp_path / ".gitignore").write_text("cache/\n")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=tmp_path, check=True)
    (tmp_path / "edited.txt").write_text("a local edit made before the run\n")
    return tmp_path


def test_snapshot_sees_every_kind_of_change(repo):
    before = worktree.snapshot(repo)
    assert before is not None and list(before) == ["edited.txt"]
    assert worktree.changes(before, worktree.snapshot(repo)) == []

    (repo / "edited.txt").write_text("rewritten by the run\n")  # modified before and after
    (repo / "new" / "deep").mkdir(parents=True)
    (repo / "new" / "deep" / "out.csv").write_text("x\n")
    (repo / "kept.txt").unlink()
    (repo / "cache").mkdir()
    (repo / "cache" / "ignored.bin").write_bytes(b"\0")  # ignored: not a change
    after = worktree.snapshot(repo)
    assert worktree.changes(before, after) == ["edited.txt", "kept.txt", "new/deep/out.csv"]


def test_snapshot_outside_a_checkout_is_none(tmp_path):
    assert worktree.snapshot(tmp_path) is None
