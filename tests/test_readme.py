"""The documentation's commands are the code's: every ``diffslim CMD --option`` the README and the pages under
``docs/`` quote names a command and options that exist, the README's command table lists every command, every
``bench/SCRIPT.py`` invocation uses options the script takes and gives the ones it requires (a session found three
quoted bench commands missing a required ``--out``), every relative link points at a file and heading that
exist, and the Python examples call functions and keywords that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = "\n".join([README] + [page.read_text() for page in PAGES])
_ENV = r"(?:[A-Z_]+=\S*\s+)*"  # OMP_NUM_THREADS=2 and the like before a command
_OPTION = r"(?<![\w-])(--[a-z][a-z0-9-]*)"


def _command_lines() -> list[str]:
    """Each shell line of the documentation's code blocks (continuations joined) and each inline code span."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOCS, flags=re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").split("\n")]
    prose = re.sub(r"```.*?```", "", DOCS, flags=re.S).replace("\n", " ")
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


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but hyphens and underscores dropped, spaces as
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    assert len(PAGES) >= 8  # the pages the README's documentation list links
    broken = []
    for doc in [ROOT / "README.md", *PAGES]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text.replace("\n", " ")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in {
                    _anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}:
                broken.append(f"{doc.name}: {target}: no such heading")
    assert broken == []


def test_the_readme_links_every_page_of_the_docs():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked == {page.name for page in PAGES}


@pytest.mark.parametrize("heading, anchor", [("Stacking methods: the guided workflow", "stacking-methods-the-guided-workflow"),
                                             ("`auto`: the most aggressive setting", "auto-the-most-aggressive-setting"),
                                             ("torch.compile", "torchcompile")])
def test_anchors_are_githubs(heading, anchor):
    assert _anchor(heading) == anchor


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS, flags=re.S)


def test_the_python_examples_parse_and_call_what_exists():
    """Every ``python`` block of the documentation parses, every ``diffslim.NAME`` and ``from diffslim... import
    NAME`` it uses exists, and every keyword it passes to one of diffslim's functions is a parameter of it."""
    import importlib
    import inspect

    blocks = _python_blocks()
    assert len(blocks) >= 5
    checked = 0
    for block in blocks:
        tree = ast.parse(block)
        names = {"diffslim": importlib.import_module("diffslim")}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffslim":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"from {node.module} import {alias.name}: no such name"
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "diffslim":
                assert hasattr(names["diffslim"], node.attr), f"diffslim.{node.attr}: no such name"
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "diffslim":
                fn = getattr(names["diffslim"], f.attr)
            elif isinstance(f, ast.Name) and f.id in names and f.id != "diffslim":
                fn = names[f.id]
            else:
                continue
            params = inspect.signature(fn).parameters
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                continue
            for kw in node.keywords:
                assert kw.arg is None or kw.arg in params, f"{ast.unparse(node)}: {fn.__name__} takes no {kw.arg}="
            checked += 1
    assert checked >= 8
