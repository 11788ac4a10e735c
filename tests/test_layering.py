"""The package's import rules (docs/architecture.md), read from the source with ``ast``: imports point one way
(cli → bench → parallel → train → methods → local → models; tasks, data and measure below the engines), no two
modules import each other (directly or around a cycle), nobody imports another package's ``_private`` names,
no file outside the engine reaches into its optimizers, scaler or statistics, and docstrings cite the project's
docs and papers, not issue numbers or files outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "locallearn"

# What each folder may import from (besides itself); anything else is a wrong-way import.
ALLOWED = {
    "models": set(),
    "data": set(),
    "measure": set(),
    "tasks": {"models", "data"},  # a task builds its head and scores with its data format's metric (COCO mAP)
    "local": {"models"},
    "methods": {"local", "tasks", "models"},
    "train": {"methods", "local", "tasks", "models", "data", "measure"},
    "parallel": {"train", "methods", "local", "tasks", "models", "data", "measure"},
    "bench": {"parallel", "train", "methods", "local", "tasks", "models", "data", "measure"},
    "cli": {"bench", "parallel", "train", "methods", "local", "tasks", "models", "data", "measure"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported locallearn module, names taken from it, line) for every import in the file, nested ones too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("locallearn"):
                names = [a.name for a in node.names]
                # ``from . import dgl`` imports the submodule locallearn.methods.dgl
                subs = [
                    f"{target}.{n}"
                    for n in names
                    if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()
                ]
                found += [(s, [], node.lineno) for s in subs] or [(target, names, node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("locallearn")]
    return found


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


FILES = sorted(PACKAGE.rglob("*.py"))


def test_imports_point_one_way() -> None:
    wrong = []
    for path in FILES:
        src = folder(module_name(path))
        if src is None:  # locallearn/__init__.py, __main__.py: the public front door
            continue
        for target, _, line in imports(path):
            dst = folder(target)
            if dst is not None and dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({src} → {dst})")
    assert not wrong, "imports against the layering: " + ", ".join(wrong)


def test_no_private_names_across_modules() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line} imports {n} from {target}"
        for path in FILES
        for target, names, line in imports(path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not wrong, "; ".join(wrong)


def is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycles() -> None:
    """No module reaches itself through imports. Package ``__init__`` files are left out: they re-export their
    folder, and a cycle through one is how Python packages work."""
    graph = {
        module_name(p): {t for t, _, _ in imports(p) if not is_package(t)}
        for p in FILES
        if p.name not in ("__init__.py", "__main__.py")
    }
    state: dict[str, str] = {}  # grey while on the walk's path, black when finished

    def walk(node: str, path: list[str]) -> None:
        state[node] = "grey"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = "black"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])


def test_docstrings_cite_specs_not_issue_numbers() -> None:
    pattern = re.compile(r"\bissue\s*#?\d+", re.IGNORECASE)
    found = [f"{p.relative_to(PACKAGE)}" for p in FILES if pattern.search(p.read_text())]
    assert not found, "issue numbers in: " + ", ".join(found)


def test_only_the_engine_touches_its_optimizers_scaler_and_statistics() -> None:
    """Runtimes and benchmarks use the engine's named methods (``train_step``, ``zero_grad``, ``step_module``,
    ``scale``, ``lr``, ``stage_state_dict``, ``optimizer_tensors``), never its internals."""
    pattern = re.compile(r"\.(_?optimizers|_?scaler|stats)\b(?!_)")
    engine = PACKAGE / "train" / "engine.py"
    found = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in FILES
        if p != engine
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and "evaluator.stats" not in line  # (pycocotools' COCOeval result)
    ]
    assert not found, "engine internals used in: " + ", ".join(found)


def test_one_epoch_loop() -> None:
    """The trainer holds the only loop over epochs; runtimes hold none."""
    loops = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in FILES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"while .*epoch.* < .*epochs", line)
    ]
    assert [where.split(":")[0] for where in loops] == ["train/trainer.py"], loops


def test_docstrings_cite_docs_not_outside_specs() -> None:
    """A reader of the checkout can follow every citation: no "spec §x.y" or brief outside the repository."""
    pattern = re.compile(r"\bspec\b[^\n]{0,20}§|\b(methods|pipeline|engineering)\.md\b(?<!docs/methods\.md)")
    found = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in FILES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and "docs/" not in line
    ]
    assert not found, "citations of files outside the repository: " + ", ".join(found[:20])
