"""The layering of docs/ARCHITECTURE.md, checked on the imports themselves: every import runs downhill
(or within a layer), and no library module imports a command module."""

import ast
from pathlib import Path

import pytest

from tests.launcher import REPO

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = [
    [
        "ilm_dist._C",
        "ilm_dist.errors",
        "ilm_dist.cpu_placement",
        "ilm_dist.folder_lock",
        "ilm_dist.strict",
        "ilm_dist.paths",
        "ilm_dist.distributed",
        "ilm_dist.serialization",
        "ilm_dist.options",
        "ilm_dist.ray_connect",
    ],
    ["ilm_dist.ops", "ilm_dist.moco", "ilm_dist.losses"],
    ["ilm_dist.config", "ilm_dist.processes"],
    ["ilm_dist.data", "ilm_dist.model", "data_tools"],
    ["ilm_dist.train"],
    ["ilm_dist.eval", "ilm_dist.plan"],
    ["ilm_dist.tune", "ilm_dist.pretrain", "ilm_dist.experiment"],
]
COMMANDS = {
    "ilm_dist.pretrain",
    "ilm_dist.eval.commands",
    "ilm_dist.eval.__main__",
    "ilm_dist.eval.knn_check",
    "ilm_dist.tune.command",
    "ilm_dist.experiment.command",
    "data_tools.pack",
    "data_tools.verify",
    "data_tools.synthetic_dataset",
}


def layer_of(module: str) -> int | None:
    if module == "ilm_dist":  # the package itself: its __init__ imports nothing
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def modules() -> dict[str, Path]:
    found = {}
    for package in ("ilm_dist", "data_tools"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time (``TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("ilm_dist", "data_tools")}


ALL = modules()


def test_every_module_has_a_layer():
    assert [name for name in ALL if layer_of(name) is None] == []


@pytest.mark.parametrize("name", sorted(ALL))
def test_imports_run_downhill_and_never_into_a_command(name):
    own = layer_of(name)
    for target in imports(ALL[name]):
        if target not in ALL:  # a name imported from a module, e.g. ilm_dist.config.RunConfig
            continue
        assert layer_of(target) <= own, f"{name} (layer {own}) imports {target} (layer {layer_of(target)})"
        if name not in COMMANDS:
            assert target not in COMMANDS, f"library module {name} imports the command module {target}"
