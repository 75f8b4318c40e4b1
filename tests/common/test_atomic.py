"""common/atomic.py: a failed write leaves the previous output intact and no temporary behind."""
from __future__ import annotations

import os

import pytest

from megatron_diffu.common.atomic import (AtomicFiles, atomic_dir, atomic_path, atomic_write_bytes,
                                          atomic_write_json, atomic_write_jsonl, atomic_write_text, fsync_tree,
                                          temporary_sibling)


class Boom(Exception):
    pass


def _names(d):
    return sorted(os.listdir(d))


def test_temporary_sibling_is_beside_the_final(tmp_path):
    t = temporary_sibling(tmp_path / "a.json")
    assert t.parent == tmp_path and t.name == f"a.json.tmp-{os.getpid()}"
    assert temporary_sibling(tmp_path / "d", "old").name == f"d.old-{os.getpid()}"


def test_writes_replace_and_leave_no_temporary(tmp_path):
    f = tmp_path / "out.txt"
    atomic_write_text(f, "one")
    atomic_write_text(f, "two")
    assert f.read_text() == "two"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "c.json", {"a": 1})
    assert (tmp_path / "c.json").read_text() == '{\n  "a": 1\n}\n'
    assert atomic_write_jsonl(tmp_path / "d.jsonl", iter([{"x": 1}, {"x": 2}])) == 2
    assert (tmp_path / "d.jsonl").read_text() == '{"x": 1}\n{"x": 2}\n'
    assert _names(tmp_path) == ["b.bin", "c.json", "d.jsonl", "out.txt"]


def test_failure_mid_write_keeps_the_previous_file(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("previous")
    with pytest.raises(Boom):
        with atomic_path(f) as tmp:
            tmp.write_text("half of the new")
            raise Boom
    assert f.read_text() == "previous" and _names(tmp_path) == ["out.txt"]

    def records():
        yield {"ok": 1}
        raise Boom

    with pytest.raises(Boom):
        atomic_write_jsonl(f, records())
    assert f.read_text() == "previous" and _names(tmp_path) == ["out.txt"]


def test_atomic_path_without_a_written_file_fails_cleanly(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("previous")
    with pytest.raises(FileNotFoundError):
        with atomic_path(f, fsync=True):
            pass  # nothing written
    assert f.read_text() == "previous" and _names(tmp_path) == ["out.txt"]


def test_atomic_files_commit_in_order_with_indexes_last(tmp_path, monkeypatch):
    bin_, idx = tmp_path / "d.bin", tmp_path / "d.idx"
    bin_.write_text("old bin")
    idx.write_text("old idx")
    files = AtomicFiles([idx, bin_], indexes=[idx], fsync=True)  # the index is moved last anyway
    files.temps[0].write_text("new idx")
    files.temps[1].write_text("new bin")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        # at every move: an index on disk is never older than the data beside it
        seen.append((os.path.basename(dst), idx.exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    files.commit()
    assert seen == [("d.bin", False), ("d.idx", False)]  # old .idx removed before the new .bin arrived
    assert bin_.read_text() == "new bin" and idx.read_text() == "new idx" and _names(tmp_path) == ["d.bin", "d.idx"]


def test_atomic_files_abort_and_context(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("previous a")
    with pytest.raises(Boom):
        with AtomicFiles([a, b]) as files:
            files.temps[0].write_text("new a")
            files.temps[1].write_text("new b")
            raise Boom
    assert a.read_text() == "previous a" and _names(tmp_path) == ["a"]
    with AtomicFiles([a, b]) as files:
        for t in files.temps:
            t.write_text(t.name)
    assert _names(tmp_path) == ["a", "b"] and a.read_text().startswith("a.tmp-")
    work = tmp_path / "work"
    work.mkdir()
    explicit = AtomicFiles([tmp_path / "c"], temps=[work / "c.part"])
    (work / "c.part").write_text("c")
    explicit.commit()
    assert (tmp_path / "c").read_text() == "c" and _names(work) == []
    with pytest.raises(ValueError):
        AtomicFiles([a], temps=[])
    with pytest.raises(ValueError):
        AtomicFiles([a], indexes=[b])


def test_atomic_files_commit_failure_removes_the_temporaries(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = AtomicFiles([a, b])
    files.temps[0].write_text("a")  # the second temporary was never written: its move fails
    with pytest.raises(FileNotFoundError):
        files.commit()
    assert _names(tmp_path) == ["a"]  # the first move happened; no temporary is left


def test_atomic_dir_replaces_only_on_success(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(d) as tmp:
            (tmp / "new.txt").write_text("half")
            raise Boom
    assert _names(d) == ["old.txt"] and _names(tmp_path) == ["out"]
    with atomic_dir(d) as tmp:
        assert tmp != d and tmp.parent == tmp_path and tmp.is_dir()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert _names(d) == ["old.txt"]  # not replaced before the block ends
    assert _names(d) == ["sub"] and (d / "sub" / "new.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]  # neither the temporary nor the previous directory is left
    with atomic_dir(tmp_path / "fresh" / "deep") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "fresh" / "deep" / "x").read_text() == "x"


def test_atomic_dir_clears_a_stale_temporary(tmp_path):
    d = tmp_path / "out"
    stale = temporary_sibling(d)
    stale.mkdir()
    (stale / "junk").write_text("from a crashed run")
    with atomic_dir(d) as tmp:
        assert _names(tmp) == []
    assert _names(tmp_path) == ["out"]


def test_fsync_tree_runs_on_a_tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    fsync_tree(tmp_path)  # no error on nested directories and files
