"""The README's commands are the code's: every ``diffslim CMD --option`` it quotes names a command and options that
exist, its command table lists every command, and every ``bench/SCRIPT.py`` invocation uses options the script
takes and gives the ones it requires (a session found three quoted bench commands missing a required ``--out``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_ENV = r"(?:[A-Z_]+=\S*\s+)*"  # OMP_NUM_THREADS=2 and the like before a command
_OPTION = r"(?<![\w-])(--[a-z][a-z0-9-]*)"


def _command_lines() -> list[str]:
    """Each shell line of the README's code blocks (continuations joined) and each inline code span."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").split("\n")]
    prose = re.sub(r"```.*?```", "", README, flags=re.S).replace("\n", " ")
    return lines + re.findall(r"`([^`]+)`", prose)


def _invocations(prefix: str, name: str = r"[a-z][a-z-]*") -> list[tuple[str, str]]:
    """``(name, arguments)`` of every line or span that starts with ``prefix NAME`` (after environment variables
    or a ``.venv/bin/`` path), the arguments up to a shell separator or a comment."""
    pattern = re.compile(rf"^\s*(?:#.*\n)?{_ENV}(?:\.venv/bin/)?{prefix}({name})([^|;&#]*)")
    return [(m.group(1), m.group(2)) for line in _command_lines() for m in [pattern.match(line)] if m]


def _cli_options() -> dict[str, set[str]]:
    import typer

    from diffslim.cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            for name, cmd in group.commands.items()}


def test_every_quoted_diffslim_command_and_option_exists():
    options = _cli_options()
    quoted = _invocations(r"diffslim ")
    assert len(quoted) > 50  # the README quotes its commands throughout
    wrong = [f"diffslim {cmd}{args}: no command {cmd!r}" for cmd, args in quoted if cmd not in options]
    wrong += [f"diffslim {cmd}{args}: {cmd} takes no {opt}" for cmd, args in quoted if cmd in options
              for opt in re.findall(_OPTION, args) if opt not in options[cmd]]
    assert wrong == []


def test_the_command_table_lists_every_command():
    table = README[README.index("## What is in it"):]
    table = table[:table.index("\n\n", table.index("| command |"))]
    listed = set(re.findall(r"^\| `diffslim ([a-z-]+)", table, flags=re.M))
    assert listed == set(_cli_options())


def _script_options(path: Path) -> tuple[set[str], set[str]]:
    """The ``--options`` a bench script's argparse takes, and those it requires."""
    takes, required = {"--help"}, set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
            takes |= names
            if any(k.arg == "required" and getattr(k.value, "value", None) is True for k in node.keywords):
                required |= names
    return takes, required


def test_every_quoted_bench_script_takes_its_options_and_gets_the_required_ones():
    quoted = _invocations(r"(?:python\S*\s+)bench/", r"\w+\.py")
    assert len(quoted) > 20
    wrong = []
    for script, args in quoted:
        path = ROOT / "bench" / script
        if not path.is_file():
            wrong.append(f"bench/{script}: no such script")
            continue
        takes, required = _script_options(path)
        used = set(re.findall(_OPTION, args))
        wrong += [f"bench/{script}{args}: takes no {opt}" for opt in sorted(used - takes)]
        if "--help" not in used:
            wrong += [f"bench/{script}{args}: misses the required {opt}" for opt in sorted(required - used)]
    assert wrong == []


@pytest.mark.parametrize("line, found", [
    ("OMP_NUM_THREADS=2 .venv/bin/python bench/kd_seeds.py zoo:sr --seeds 0,1", [("kd_seeds.py", " zoo:sr --seeds 0,1")]),
    ("diffslim sample x --n 2", []),
])
def test_the_bench_invocation_pattern_reads_what_it_should(line, found, monkeypatch):
    """The pattern the bench check uses finds a quoted script with its arguments, and only scripts."""
    monkeypatch.setitem(globals(), "_command_lines", lambda: [line])
    assert _invocations(r"(?:python\S*\s+)bench/", r"\w+\.py") == found
