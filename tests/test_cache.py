"""The cache folder: one process builds an entry while another waits for it; listing and clearing entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from typer.testing import CliRunner

from diffslim import cache
from diffslim.cli import app

_BUILD = """
import sys, time
from pathlib import Path
from diffslim.cache import building
root = Path(sys.argv[1])
with building(root / "layer_kd" / "k", "the test's run"):
    done = root / "layer_kd" / "k" / "done"
    if not done.exists():
        with open(root / "log", "a") as f:
            f.write(f"start {time.monotonic()}\\n")
        time.sleep(2)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
        with open(root / "log", "a") as f:
            f.write(f"end {time.monotonic()}\\n")
"""


def test_two_processes_needing_one_entry_build_it_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert [line.split()[0] for line in (tmp_path / "log").read_text().splitlines()] == ["start", "end"]
    waited = [e for e in errs if f"waiting for another process that is building the test's run in " in e]
    assert len(waited) == 1, errs


def _entry(path, size, days_old=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - days_old * 86400
    os.utime(path, (t, t))
    for p in (path.parent,):
        os.utime(p, (t, t))


def test_cache_lists_and_clears_by_kind_and_age(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path))
    _entry(tmp_path / "refs" / "a.safetensors", 100, days_old=10)
    _entry(tmp_path / "refs" / "b.safetensors", 50)
    _entry(tmp_path / "refs" / "c.123.tmp", 7)  # another process's file being written: not an entry
    _entry(tmp_path / "finetune" / "old" / "student" / "w.safetensors", 1000, days_old=5)
    _entry(tmp_path / "finetune" / "new" / "student" / "w.safetensors", 2000)
    _entry(tmp_path / "dipgo" / "busy" / "scores.npy", 30, days_old=9)
    _entry(tmp_path / "teacher_samples" / "sampled" / "000000.png", 5)  # a bench's training images from prompts
    run = CliRunner()

    r = run.invoke(app, ["cache", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["root"] == str(tmp_path)
    assert [(e["kind"], os.path.basename(e["path"]), e["bytes"]) for e in got["entries"]] == [
        ("refs", "a.safetensors", 100), ("refs", "b.safetensors", 50), ("finetune", "old", 1000),
        ("finetune", "new", 2000), ("dipgo", "busy", 30), ("teacher_samples", "sampled", 5)]
    assert 9.9 < got["entries"][0]["age_days"] < 10.1

    said = lambda r: " ".join(r.output.split())  # noqa: E731 (rich wraps long lines)
    r = run.invoke(app, ["cache", "--clear", "finetune,refs", "--older-than", "1"])
    assert r.exit_code == 0 and "removed 2 entries" in said(r), r.output
    assert sorted(e.path.name for e in cache.entries(tmp_path)) == ["b.safetensors", "busy", "new", "sampled"]

    with cache.building(tmp_path / "dipgo" / "busy", "a run"):  # being built: kept
        r = run.invoke(app, ["cache", "--clear", "all"])
    assert r.exit_code == 0 and "removed 3 entries" in said(r), r.output
    assert "kept 1 that another process is building" in said(r), r.output
    assert [e.path.name for e in cache.entries(tmp_path)] == ["busy"]
    r = run.invoke(app, ["cache", "--clear", "dipgo"])
    assert "removed 1 entry" in said(r) and cache.entries(tmp_path) == []


def test_cache_refuses_unknown_kinds_and_a_lone_age(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path))
    _entry(tmp_path / "refs" / "a.safetensors", 10)
    run = CliRunner()
    for args, says in ((["--clear", "refs,models"], "unknown kind models; accepted: all, refs, finetune"),
                       (["--clear", ","], "unknown kind (none given)"),
                       (["--older-than", "2"], "--older-than chooses what --clear removes"),
                       (["--clear", "all", "--older-than", "-1"], "--older-than must be >= 0 days")):
        r = run.invoke(app, ["cache", *args])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), (args, r.output)
    assert len(cache.entries(tmp_path)) == 1  # nothing removed
