"""Output folders: which command wrote one, what it wrote there, and whether a command may write it.

Every command that writes a folder records itself in ``OUT/.diffslim.json`` before it writes there (``claim_out``),
so that another command's ``--out`` into it is refused (their files would mix) and a rerun of the same command
removes only what its earlier run wrote (``previous_writes``, ``remove_previous``). The CLI calls these at its
boundary, before any work starts; a failed command takes its claim back (``settle_claims``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from diffslim.errors import UserError
from diffslim.launch import world_size

# Which command wrote an output folder: ``OUT/.diffslim.json`` records it (``claim_out``). For folders written before
# the record: the file each command leaves (first match wins; report.json last, as every report has one).
RECORD = ".diffslim.json"
_OUT_SIGNS = (("workflow.json", ("workflow",)), ("compare.json", ("layer-compare",)),
              ("distill.json", ("distill", "finetune")), ("scores.json", ("layer-prune",)),
              ("*/train_settings.json", ("zoo-train",)), ("scores.npy", ("dipgo",)), ("grid.png", ("sample",)),
              ("report.json", ("demo", "bench")))


def out_owner(out: Path) -> Optional[tuple[tuple[str, ...], str]]:
    """The commands that may write into ``out`` again, and what says so; None for a folder no command wrote."""
    record = out / RECORD
    if record.is_file():
        try:
            command = json.loads(record.read_text()).get("command")
        except (ValueError, AttributeError, OSError):
            command = None
        if isinstance(command, str):
            return (command,), RECORD
    for sign, commands in _OUT_SIGNS:
        if next(iter(out.glob(sign)), None) is not None:
            return commands, sign
    for sign in ("model_index.json", "config.json"):  # a model a user made, or one diffslim wrote before the record
        if (out / sign).is_file() and (sign == "model_index.json" or _diffusers_config(out / sign)):
            return (), sign
    return None


def _diffusers_config(path: Path) -> bool:
    """Whether ``path`` is a diffusers model's config.json (not, say, an application's own config.json)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("_class_name" in data or "_diffusers_version" in data)


def _check_out_owner(out: Path, command: str, option: str) -> None:
    """Refuse ``--out`` into a folder another command wrote (or a model folder): the two commands' files would mix,
    and some would be replaced (layer-prune's pipeline/ over a distill run's, whose student/ stays). The same command
    may write it again (that is how runs resume)."""
    owner = out_owner(out) if out.is_dir() else None
    if owner is None or command in owner[0]:
        return
    commands, sign = owner
    what = (f"the output of `diffslim {' or '.join(commands)}`" if commands
            else "a model folder, which it would overwrite or mix its files into")
    raise UserError(f"{option} {out} holds {what} ({sign}); `diffslim {command}` writes its own files there: give "
                    "another folder, or remove that one first")


_CLAIMS: list[tuple[Path, bool, Optional[bytes]]] = []  # this command's claims: folder, whether it was there, record


def claim_out(out: Path, command: str) -> bool:
    """Record that ``command`` writes ``out`` (made now): called once the command's checks have passed, before it
    writes there. True when an earlier run of ``command`` wrote the folder (its record, or the file it leaves). A
    command that fails before it writes anything there takes the claim back (``settle_claims``)."""
    before = out_owner(out) if out.is_dir() else None
    record = out / RECORD
    _CLAIMS.append((out, out.is_dir(), record.read_bytes() if record.is_file() else None))
    out.mkdir(parents=True, exist_ok=True)
    from diffslim import __version__

    _write_record(out, {"command": command, "diffslim": __version__})
    return before is not None and command in before[0]


def previous_writes(out: Path, legacy: tuple = ()) -> list[str]:
    """The names an earlier run wrote at the top of ``out``, as its record lists them (``legacy``: for a folder
    written before the record listed them). Read before ``claim_out`` rewrites the record."""
    try:
        wrote = json.loads((out / RECORD).read_text()).get("wrote")
    except (OSError, ValueError, AttributeError):
        wrote = None
    if isinstance(wrote, list) and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                       for n in wrote):
        return [n for n in wrote if n != RECORD]
    return list(legacy)


def record_writes(out: Path, before: set) -> None:
    """Add what this run wrote at the top of ``out`` (what is there now and was not ``before``) to its record: a
    rerun removes those and nothing else."""
    data = json.loads((out / RECORD).read_text())
    _write_record(out, {**data, "wrote": sorted({p.name for p in out.iterdir()} - set(before) - {RECORD})})


def _write_record(out: Path, data: dict) -> None:
    """Write ``OUT/.diffslim.json`` whole: a rename is atomic, so no process of a launch reads a half-written one."""
    tmp = out / f"{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(out / RECORD)


def model_inside(model: str, out: Path, names, option: str = "--out") -> None:
    """Refuse an ``out`` whose entries ``names`` (what the command writes there, or removes of its earlier run) hold
    the MODEL it reads: it would remove or overwrite its own input."""
    if model.startswith("zoo:"):
        return
    m, o = Path(model).resolve(), out.resolve()
    inside = [n for n in names if m == o / n or (o / n) in m.parents]
    if m == o or inside:
        raise UserError(f"MODEL {model} lies inside {option} {out}"
                        + (f" ({inside[0]}, which this command rewrites)" if inside else ", which this command "
                           "rewrites") + f": give another {option}")


def settle_claims(failed: bool) -> None:
    """After a command: a failed one leaves a folder it claimed and then wrote nothing into as it was (a refused
    workflow must not make its folder the workflow's for the next command). Either way its claims are forgotten."""
    while _CLAIMS:
        out, existed, record = _CLAIMS.pop()
        if not failed:
            continue
        try:
            if [p.name for p in out.iterdir()] != [RECORD]:
                continue
            if record is None:
                (out / RECORD).unlink()
                if not existed:
                    out.rmdir()
            else:
                (out / RECORD).write_bytes(record)
        except OSError:
            pass


def remove_previous(out: Path, names) -> None:
    """Remove what an earlier run of the same command wrote under ``out`` (``claim_out`` said it is that command's
    folder): a rerun that writes less (a lone model after a pipeline, a config after weights) must not
    leave the earlier run's files beside its own."""
    import shutil

    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def out_folder(out: Path, option: str = "--out", command: Optional[str] = None) -> Path:
    """Check, before any work starts, that the output folder can be written: a file in its place, or a folder that
    cannot be made or written, is a one-line error now rather than a traceback after the work. Leaves no trace:
    folders made to find out are removed again (the command makes them when it writes). With ``command``: also that
    no other command wrote the folder (``_check_out_owner``)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file; give a folder")
    if command is not None:
        _check_out_owner(out, command, option)
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write into {option} {out}: {e.strerror}") from None
    finally:
        # under a launch another process may be testing the same folder now: removing it would fail that one's test
        for d in missing if world_size() <= 1 else ():  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
    return out


def out_file(path: Path, option: str = "--out", example: str = "recipe.json") -> Path:
    """Check, before any work, that ``path`` can be written as a file (its folder is made now)."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    owner = out_owner(path.parent) if path.exists() and path.parent.is_dir() else None
    if owner is not None and owner[0]:  # e.g. a workflow's recipe.json, which its stages and report go with
        raise UserError(f"{option} {path} is a file of `diffslim {' or '.join(owner[0])}`'s output in "
                        f"{path.parent} ({owner[1]}); replacing it would leave that folder describing another "
                        "result: give another file name")
    out_folder(path.parent if str(path.parent) else Path("."), f"{option}'s folder")
    path.parent.mkdir(parents=True, exist_ok=True)  # recipes and figures are saved into an existing folder
    return path


def figure_file(path: Path, option: str, example: str) -> Path:
    """``out_file`` for a figure: also its format, which matplotlib takes from the suffix (none: PNG)."""
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in kinds:
        raise UserError(f"{option} {path}: matplotlib writes no {path.suffix} figures; give one of "
                        + ", ".join("." + k for k in sorted(kinds)))
    return out_file(path, option, example)


def share_files(src: Path, dst: Path, only_identical: bool = False) -> int:
    """Keep one copy on disk of what two output folders both hold (the pruned denoiser in ``model/`` and in
    ``pipeline/unet/``; a trained student in ``student/`` and in ``pipeline/``): every file directly in ``src`` becomes
    a hard link in ``dst`` (a copy where the filesystem has no hard links). ``only_identical``: link only over files
    ``dst`` already holds with the same bytes, and leave the rest. Returns the bytes no longer stored twice."""
    import filecmp
    import shutil

    saved = 0
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.iterdir() if p.is_file() and not p.is_symlink()):
        target = dst / f.name
        if only_identical and not (target.is_file() and filecmp.cmp(f, target, shallow=False)):
            continue
        if target.exists() and os.path.samefile(f, target):
            continue
        tmp = dst / f".{f.name}.link"
        tmp.unlink(missing_ok=True)  # left by an interrupted run
        try:
            os.link(f, tmp)
            saved += f.stat().st_size
        except OSError:  # another filesystem, or one without hard links
            if only_identical:  # the copy it holds is as good
                continue
            shutil.copy2(f, tmp)
        os.replace(tmp, target)  # atomic: ``dst`` holds the old file or the link, never half of either
    return saved
