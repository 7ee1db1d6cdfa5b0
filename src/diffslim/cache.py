"""diffslim's cache folder, ``$DIFFSLIM_CACHE`` or ``~/.cache/diffslim``, and building its entries one process at
a time.

Kinds of entries, each a folder of the cache:

- ``refs``: the full model's reference samples of the searches, ``evaluate`` and ``bench`` (one file each);
- ``finetune``, ``layer_kd``, ``dipgo``: the bench's and workflow's short training runs of ``depth:N+ft``,
  ``layers:R+kd`` and ``dipgo:R`` (one folder each, with its checkpoints, so that a stopped run resumes);
- ``teacher_samples``: the images a pipeline sampled from the bench's or workflow's prompts to train ``+kd`` and
  ``+ft`` on where no ``--data`` was given (one folder each, resumed if interrupted).

Two processes that need the same training run (two benches on two GPUs of one machine) must not write into one
folder at once: :func:`building` holds a lock file beside the entry while one of them builds it, and the other waits,
then finds it built; the processes of one `accelerate launch` build it together (:func:`build_once`).
``diffslim cache`` lists the entries and clears them (see :func:`entries`, :func:`clear`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

KINDS = {
    "refs": "the full model's reference samples (searches, evaluate, bench)",
    "finetune": "depth:N+ft training runs (bench, workflow)",
    "layer_kd": "layers:R+kd training runs (bench, workflow)",
    "dipgo": "dipgo:R training runs (bench, workflow)",
    "teacher_samples": "images the full model sampled from the prompts: +kd/+ft training data without --data",
}


def cache_root() -> Path:
    """``$DIFFSLIM_CACHE``, or ``~/.cache/diffslim``."""
    return Path(os.environ.get("DIFFSLIM_CACHE", Path.home() / ".cache" / "diffslim"))


def _lock_path(entry: Path) -> Path:
    return entry.parent / f"{entry.name}.lock"


@contextmanager
def building(entry: Path, what: str):
    """Hold ``entry``'s lock while this process builds it. A process that finds it held waits (saying so, once,
    on stderr) until the builder is done: check again inside whether the entry is complete before building it."""
    from filelock import FileLock, Timeout

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(_lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        sys.stderr.write(f"waiting for another process that is building {what} in {entry}\n")
        sys.stderr.flush()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(entry: Path, what: str, done, build) -> bool:
    """Build the cache entry ``entry`` by calling ``build()`` unless ``done()`` says it is there; True when this call
    built it. One process at a time builds an entry (:func:`building`), and one started by `accelerate launch` builds
    it with the other processes of its launch: the first holds the lock for all of them and decides for all whether
    the entry is there, and every process then calls ``build`` together (the trainers run data parallel). The
    processes of a launch on several machines must share the cache folder."""
    from diffslim.launch import first_decides, group

    entry = Path(entry)
    dist = group()
    if dist is None:
        if done():
            return False
        with building(entry, what):
            if done():  # another process may have built it while this one waited
                return False
            build()
            return True
    first = dist.get_rank() == 0
    with building(entry, what) if first else nullcontext():
        need = first_decides(not done() if first else None)  # a process that built alone would wait forever
        if need:
            build()
        dist.barrier()  # the entry is whole before the first lets go of the lock and any process reads it
    if not done():
        raise RuntimeError(f"{entry} is not there for process {dist.get_rank()} after the launch built it: the "
                           "processes of a launch on several machines need one shared cache folder (DIFFSLIM_CACHE)")
    return need


@contextmanager
def _unless_in_use(entry: Path):
    """Yield True holding ``entry``'s lock, or False when a process holds it (it is building the entry now)."""
    from filelock import FileLock, Timeout

    lock_file = _lock_path(entry)
    if not lock_file.exists():  # never built under a lock (a reference file): nothing to wait for
        yield True
        return
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@dataclass
class Entry:
    kind: str
    path: Path
    bytes: int
    modified: float  # when its newest file was written (seconds since the epoch)

    @property
    def age_days(self) -> float:
        return max(0.0, (time.time() - self.modified) / 86400)


def _measure(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, newest = 0, None
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            size += st.st_size
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return size, path.stat().st_mtime if newest is None else newest  # its files' times; an empty folder's own


def entries(root: Path | None = None, kinds=None) -> list[Entry]:
    """The cache's entries of ``kinds`` (all by default), oldest first within each kind."""
    root = cache_root() if root is None else Path(root)
    out = []
    for kind in kinds or KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        found = []
        for p in folder.iterdir():
            if p.name.endswith((".lock", ".tmp")) or p.name.startswith("."):
                continue
            size, modified = _measure(p)
            found.append(Entry(kind, p, size, modified))
        out += sorted(found, key=lambda e: e.modified)
    return out


def clear(root: Path | None = None, kinds=None, older_than_days: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove the entries of ``kinds`` (all by default) last written more than ``older_than_days`` ago (any age by
    default). Entries a process is building now are kept, and so are the lock files (removing one another process
    waits on would let two processes build at once). Returns ``(removed, kept_in_use)``."""
    removed, busy = [], []
    for e in entries(root, kinds):
        if older_than_days is not None and e.age_days <= older_than_days:
            continue
        with _unless_in_use(e.path) as free:  # held while removing: no process starts building it meanwhile
            if not free:
                busy.append(e)
                continue
            if e.path.is_dir():
                shutil.rmtree(e.path)
            else:
                e.path.unlink()
        removed.append(e)
    return removed, busy
