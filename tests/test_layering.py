"""The design's one rule of structure: imports run one way, down (../shared/DESIGN.md), lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import diffslim
from diffslim.models import derived
from diffslim.models.load import SUPPORTED_DENOISERS

SRC = Path(diffslim.__file__).parent
# DESIGN's floors, top down: cli -> workflow/bench/report -> apply -> methods -> recipe, sample, measure, train ->
# models -> zoo; the leaves below them import nothing of diffslim above them. Modules on one floor may import each
# other. ``demo`` runs the bench and the report; ``combined``, ``compiling``, ``lora`` and ``ip_adapter`` sit on
# apply's floor (they stack or wrap two methods' models); ``evaluate`` (metrics over samples) on the sampler's.
FLOORS = {"cli": 7, "workflow": 6, "bench": 6, "report": 6, "demo": 6,
          "apply": 5, "compiling": 5, "combined": 5, "lora": 5, "ip_adapter": 5,
          "methods": 4,
          "recipe": 3, "sample": 3, "measure": 3, "train": 3, "evaluate": 3,
          "models": 2,
          "zoo": 1,
          "errors": 0, "cache": 0, "launch": 0, "outputs": 0}


def _floor(module: str) -> int:
    top = module.split(".")[1]
    assert top in FLOORS, f"{module}: a module DESIGN's floors (FLOORS here) do not place"
    return FLOORS[top]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every diffslim module ``path`` imports, anywhere in it (inside functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "diffslim":
            if node.module == "diffslim":  # `from diffslim import x`: a submodule, or the package's own attribute
                found += [(f"diffslim.{a.name}", node.lineno) for a in node.names if a.name.split(".")[0] in FLOORS]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "diffslim" and a.name != "diffslim"]
    return found


def test_every_import_runs_down_the_floors():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts == ("__init__",):  # the package's public API imports from every floor
            continue
        module = "diffslim." + ".".join(p for p in parts if p != "__init__")
        for target, line in _imports(path):
            if _floor(target) > _floor(module):
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from diffslim.methods import layer_prune\n    import diffslim.cli\n")
    assert [(t, _floor(t)) for t, _ in _imports(bad)] == [("diffslim.methods", 4), ("diffslim.cli", 7)]


def test_the_loader_finds_every_exported_class_by_name_without_knowing_the_methods():
    # the pruned classes register themselves (models/derived.py); the loader's list of what it accepts names them all
    exported = {n for n in SUPPORTED_DENOISERS if n.startswith(("DepthSkip", "LayerPruned"))}
    assert exported == set(derived._CLASSES)
    for name in exported:
        cls = derived.exported_class(name)
        assert cls.__name__ == name and getattr(diffslim.methods.depth_skip, name, None) in (None, cls)
