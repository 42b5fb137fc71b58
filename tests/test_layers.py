"""The layering in DESIGN.md, kept true.

Every import of the package is seen: absolute and relative, at module level, inside functions and
under TYPE_CHECKING, `from llmos import X` resolved through the lazy re-exports of llmos/__init__, and
`llmos.X` read off an imported `llmos`. Then:

- every module has a layer, and imports only from its own layer or below;
- every `llmos.*` name imported exists (a module, or a name a module defines): a typo or a moved
  module fails here rather than being skipped;
- no import cycle, within a layer too (a cycle makes two modules one, whatever the table says);
- the forbidden edges hold: the engine never sees text or the store, nothing imports the CLI
  (bench/ included), and the reference implementations stay out of the package.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmos"

# Module prefix -> layer. The longest matching prefix wins. L0-L5 as DESIGN.md draws them; the
# modules DESIGN does not name sit where README's Architecture section places them.
LAYERS = {
    # L0: formats and plain helpers (stdlib, numpy, safetensors, gguf)
    "llmos.config": 0, "llmos.weights.safetensors": 0, "llmos.weights.gguf": 0, "llmos.weights.dequant": 0,
    "llmos.weights.names": 0, "llmos.errors": 0, "llmos.files": 0, "llmos.threads": 0, "llmos.data": 0,
    # L1: tokenizer and models (torch; tokenizers + jinja2); quant swaps modules from outside the models
    "llmos.tokenizer": 1, "llmos.spm": 1, "llmos.models": 1, "llmos.quant": 1,
    # GGUFLinear (a GGUF file's own blocks) is a quantized layer like quant's: the kernels object
    # (models/kernels.py) hands it the native products, so the loader can build it.
    "llmos.gguf_linear": 1,
    # L2: loading and the store
    "llmos.weights": 2, "llmos.store": 2, "llmos.derived": 2,
    # L3: the engine, token ids only
    "llmos.engine": 3,
    # L4: text above the engine, the Python API, tasks, training
    "llmos.generation": 4, "llmos.json_constraint": 4, "llmos.quality": 4, "llmos.api": 4, "llmos.auto": 4,
    "llmos.tasks": 4, "llmos.train": 4,
    # L5: nothing imports these
    "llmos.serve": 5, "llmos.cli": 5, "llmos.__main__": 5,
}
# The package root only re-exports (lazily) and sets the thread policy: L0 as a module.
ROOT_LAYER = 0
REFERENCES = ("transformers", "sentence_transformers", "llama_cpp")
# (importer prefix, imported prefix, why): never, whatever the layers say.
FORBIDDEN = (
    ("llmos.engine", "llmos.tokenizer", "the engine sees token ids only"),
    ("llmos.engine", "llmos.spm", "the engine sees token ids only"),
    ("llmos.engine", "llmos.store", "the engine is handed a model, it does not find one"),
    ("llmos", "llmos.cli", "the CLI is a thin layer over the Python API: nothing but `python -m llmos` imports it"),
    ("bench", "llmos.cli", "benchmarks call the Python API, not the CLI"),
)


def layer_of(module: str) -> int | None:
    if module == "llmos":
        return ROOT_LAYER
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


PACKAGE_MODULES = modules()
BENCH_MODULES = modules(ROOT / "bench")


def _is_package(name: str, path: Path) -> bool:
    return path.name == "__init__.py"


def lazy_exports() -> dict[str, str]:
    """llmos/__init__'s _EXPORTS table: attribute -> the module that defines it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


EXPORTS = lazy_exports()


@functools.cache
def defined_names(module: str) -> set[str]:
    """Top-level names a module binds (functions, classes, assignments, imports)."""
    path = PACKAGE_MODULES[module]
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions
            for inner in ast.walk(node):
                if isinstance(inner, (ast.FunctionDef, ast.ClassDef)):
                    names.add(inner.name)
                elif isinstance(inner, ast.Assign):
                    names |= {n.id for t in inner.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                elif isinstance(inner, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in inner.names}
    return names


def resolve(module: str, name: str | None) -> str | None:
    """The llmos module an import reaches: `module` itself, `module.name` when that is a module, the
    module a lazy re-export names, or None when nothing by that name exists."""
    if name is not None:
        if f"{module}.{name}" in PACKAGE_MODULES:
            return f"{module}.{name}"
        if module == "llmos" and name in EXPORTS:
            return EXPORTS[name]
        if module in PACKAGE_MODULES and (name in defined_names(module) or name == "*"):
            return module
        return None
    return module if module in PACKAGE_MODULES else None


def imports(name: str, path: Path) -> Iterator[tuple[str, str | None]]:
    """(what the source says, the llmos module it reaches or None) for each llmos import of a module;
    ("transformers...", None)-style pairs for other top-level packages are yielded as (name, "")."""
    tree = ast.parse(path.read_text())
    package = name if _is_package(name, path) else name.rpartition(".")[0]
    aliases: set[str] = set()  # local names bound to the llmos package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "llmos" or a.name.startswith("llmos."):
                    if a.name == "llmos":
                        aliases.add(a.asname or "llmos")
                    yield a.name, resolve(a.name, None)
                else:
                    yield a.name, ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..engine import y
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module != "llmos" and not module.startswith("llmos."):
                yield module, ""
                continue
            for a in node.names:
                yield f"{module}:{a.name}", resolve(module, a.name)
    if aliases:  # llmos.load(...) after `import llmos`: the lazy attribute's module
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if not node.attr.startswith("__"):
                    yield f"llmos.{node.attr}", resolve("llmos", node.attr)


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {t for _, t in imports(name, path) if t and t != name} for name, path in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in PACKAGE_MODULES if layer_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_every_llmos_import_names_something_that_exists():
    unknown = [f"{name}: {said}" for mods in (PACKAGE_MODULES, BENCH_MODULES) for name, path in mods.items()
               for said, target in imports(name, path) if target is None]
    assert not unknown, "imports of llmos names that do not exist:\n" + "\n".join(sorted(set(unknown)))


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, targets in graph(PACKAGE_MODULES).items():
        own = layer_of(name)
        for target in targets:
            if layer_of(target) > own:
                wrong.append(f"{name} (L{own}) imports {target} (L{layer_of(target)})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph(PACKAGE_MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_forbidden_edges_are_absent():
    edges = {**graph(PACKAGE_MODULES), **graph(BENCH_MODULES)}
    wrong = []
    for name, targets in edges.items():
        for target in targets:
            for src, dst, why in FORBIDDEN:
                inside = name == src or name.startswith(src + ".")
                entry = name == "llmos.__main__" and dst == "llmos.cli"
                if inside and (target == dst or target.startswith(dst + ".")) and not name.startswith(dst) and not entry:
                    wrong.append(f"{name} imports {target}: {why}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_reference_implementations_stay_out_of_the_package():
    used = [f"{name}: {said}" for name, path in PACKAGE_MODULES.items() for said, target in imports(name, path)
            if target == "" and said.split(".")[0] in REFERENCES]
    assert not used, used


def test_the_checks_see_relative_imports_and_re_exports(tmp_path):
    """The walker itself: relative imports, re-exports and `llmos.X` resolve to their modules."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..engine import sampling\nfrom . import qa\nimport llmos\nllmos.load\nfrom llmos import Index\n")
    found = {t for _, t in imports("llmos.tasks.probe", probe)}
    assert {"llmos.engine.sampling", "llmos.tasks.qa", "llmos.api", "llmos.tasks.index"} <= found


# Format readers: only weights/ itself calls them; everything else opens models through weights/loader.py.
READERS = {"load_gguf", "load_hf", "load_bert", "read_hf_config", "open_gguf_config"}


def test_models_are_opened_only_through_the_loader():
    wrong = [f"{name}: {said}" for mods in (PACKAGE_MODULES, BENCH_MODULES) for name, path in mods.items()
             if not name.startswith("llmos.weights") for said, _ in imports(name, path)
             if said.startswith("llmos.weights.load:") and said.partition(":")[2] in READERS]
    assert not wrong, "open models with llmos.weights.loader (load_model, read_config, read_tokenizer):\n" + "\n".join(wrong)


def test_no_module_changes_another_at_import():
    """No top-level `other_module.attr = ...` and no process-wide hook registered at import: a module's
    behaviour must not depend on whether some other module was imported (the native kernels are
    installed on a model, models/kernels.py)."""
    wrong = []
    for name, path in PACKAGE_MODULES.items():
        tree = ast.parse(path.read_text())
        modules_bound = {(a.asname or a.name).split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                         for a in node.names}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules_bound:
                    wrong.append(f"{name}: sets {t.value.id}.{t.attr} at import")
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                call = ast.unparse(node.value.func)
                if "register_" in call and "hook" in call or call.endswith("use_native"):
                    wrong.append(f"{name}: calls {call} at import")
    assert not wrong, "\n".join(wrong)
