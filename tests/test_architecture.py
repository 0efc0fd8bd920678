"""The layering of docs/ARCHITECTURE.md, checked on the imports themselves: every import runs downhill
(or within a layer), no library module imports a command module, the modules of ``ilm_dist.eval`` import
each other without a circle, and only ``ilm_dist.distributed`` talks to ``torch.distributed``."""

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
    "ilm_dist.plan",
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


def run_time_nodes(path: Path) -> list[ast.AST]:
    """Every node of ``path``'s syntax tree, functions' bodies included, ``TYPE_CHECKING`` blocks excluded."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for node in ast.walk(block)
    }
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imported_names(node: ast.AST) -> set[str]:
    """The dotted names an import statement names (a module, and ``module.name`` for each name taken)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return set()


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time, at module level or inside a function."""
    found = set().union(*map(imported_names, run_time_nodes(path)))
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


def test_every_console_script_is_a_command():
    tree = ast.parse((REPO / "setup.py").read_text())
    scripts = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "CONSOLE_SCRIPTS"
    )
    modules = {ast.literal_eval(item).split("=")[1].split(":")[0].strip() for item in scripts.elts}
    assert modules - COMMANDS == set()


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in ``graph`` (module -> the modules it imports), as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if cycle := visit(target, [*path, module]):
                return cycle
        done.add(module)
        return None

    return next(filter(None, (visit(module, []) for module in sorted(graph))), None)


def test_import_cycle_finds_a_circle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_eval_modules_import_each_other_without_a_circle():
    """Module-level and late (inside a function) imports alike: ``ilm_dist.eval`` draws as a tree of layers."""
    package = "ilm_dist.eval"
    members = {name for name in ALL if name.startswith(package + ".")}
    graph = {name: imports(ALL[name]) & members for name in members}
    assert import_cycle(graph) is None


# Modules that call torch.distributed themselves; every other module goes through ilm_dist.distributed.
TORCH_DISTRIBUTED_USERS = {"ilm_dist.distributed"}


def names_torch_distributed(path: Path) -> bool:
    """Whether ``path`` imports ``torch.distributed`` or names it (``torch.distributed.x``) at run time."""
    for node in run_time_nodes(path):
        names = {ast.unparse(node)} if isinstance(node, ast.Attribute) else imported_names(node)
        if any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in names):
            return True
    return False


def test_only_the_distributed_module_talks_to_torch_distributed():
    assert sorted(name for name, path in ALL.items() if names_torch_distributed(path)) == sorted(
        TORCH_DISTRIBUTED_USERS
    )
