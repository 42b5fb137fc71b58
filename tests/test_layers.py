"""The layering in DESIGN.md, kept true: a module imports only from its own layer or below, and the
reference implementations (transformers, sentence-transformers, llama-cpp-python) never appear in
the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmos"

# Module prefix -> layer. The longest matching prefix wins.
LAYERS = {
    "llmos.errors": 0, "llmos.files": 0, "llmos.threads": 0, "llmos.config": 0, "llmos.weights.safetensors": 0, "llmos.weights.gguf": 0,
    "llmos.weights.dequant": 0, "llmos.weights.names": 0, "llmos.data": 0,
    "llmos.tokenizer": 1, "llmos.models": 1, "llmos.quant": 1,
    "llmos.weights": 2, "llmos.store": 2, "llmos.derived": 2,
    "llmos.engine": 3,
    "llmos.generation": 4, "llmos.quality": 4, "llmos.api": 4, "llmos.auto": 4, "llmos.tasks": 4, "llmos.train": 4,
    "llmos.serve": 5, "llmos.cli": 5, "llmos.__main__": 5,
}
REFERENCES = ("transformers", "sentence_transformers", "llama_cpp")


def layer_of(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "llmos" and layer_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, path in modules().items():
        own = layer_of(name)
        if own is None:
            continue
        for imp in imports(path):
            if imp.startswith("llmos.") and imp.split(".")[1] not in ("__init__",):
                target = layer_of(imp)
                if target is not None and target > own:
                    wrong.append(f"{name} (L{own}) imports {imp} (L{target})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_reference_implementations_stay_out_of_the_package():
    used = [f"{name}: {imp}" for name, path in modules().items() for imp in imports(path)
            if imp.split(".")[0] in REFERENCES]
    assert not used, used
