"""Imports point one way: the IR and its data types at the bottom, then `hardware`, `passes`,
`backends`, and the driver on top (see ARCHITECTURE.md). Every module's imports are read with
`ast`, at module level and inside functions; an import that points up fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optim", "passes", "backends", "hardware")

# optim's modules that form the bottom layer (IR, ops, kernels and pass contract); every other
# module of optim is the driver, except the zoo, which sits beside the bottom layer
CORE = {"optim", "optim.errors", "optim.ir", "optim.ops", "optim.kernels", "optim.bits",
        "optim.pass_base", "optim.registry", "optim.pipeline", "optim.numerics", "optim.measure",
        "optim.host_memory", "optim.shapes", "optim.model_state", "optim.program_files",
        "optim.speed_gate",
        "optim.files"}
RANK = {"core": 0, "zoo": 1, "hardware": 1, "passes": 2, "backends": 3, "driver": 4}

# imports of heavy optional dependencies stay inside functions; they point at no layer of ours
OPTIONAL = {"tvm", "scipy", "sklearn", "matplotlib", "sentence_transformers", "diffusers",
            "safetensors", "onnxruntime", "transformers", "torch", "numpy"}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top != "optim":
        return top
    if module == "optim.zoo" or module.startswith("optim.zoo."):
        return "zoo"
    return "core" if module in CORE else "driver"


def modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.append((name, f))
    return out


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                is_pkg = path.name == "__init__.py"
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from optim import zoo` names a submodule: judge the submodule
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names
                      if (ROOT / name.replace(".", "/") / f"{a.name}.py").exists()
                      or (ROOT / name.replace(".", "/") / a.name / "__init__.py").exists()]
    return found


def wrong_way(module: str, imported: str) -> bool:
    if imported.split(".")[0] not in PACKAGES:
        return False
    src, dst = layer(module), layer(imported)
    if src == dst:
        return False
    if imported == "optim":  # the package itself: its __init__ loads the driver lazily
        return False
    return RANK[dst] >= RANK[src]


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module, path):
    bad = [f"{path.relative_to(ROOT)}:{line}: {module} ({layer(module)}) imports {name} "
           f"({layer(name)})" for line, name in imports(path, module) if wrong_way(module, name)]
    assert not bad, "imports pointing up:\n" + "\n".join(bad)


def test_the_layers_are_what_the_map_says():
    assert layer("optim.errors") == "core" and layer("optim.api") == "driver"
    assert layer("optim.zoo.data") == "zoo" and layer("passes.common.linears") == "passes"
    assert wrong_way("hardware.llm", "optim.pipeline") is False  # core: allowed
    assert wrong_way("hardware.llm", "passes.cleanup") is True
    assert wrong_way("optim.ops", "backends.tvm") is True
    assert wrong_way("passes.quantize", "optim.api") is True


# our modules that exist only as plug-ins of TVM's compiler: importing one loads the compiler
# (seconds, and absent where only TVM's runtime is installed), so they load when a build runs
HEAVY = {"backends.tvm_lowering", "backends.tvm_schedules", "backends.tvm_tuning"}


def test_function_level_imports_are_only_optional_dependencies():
    """Imports inside functions are for heavy optional dependencies, never our own modules."""
    bad = []
    for _, path in modules():
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                        if n.split(".")[0] in PACKAGES and n not in HEAVY]
    assert not bad, "function-level imports of optim's own modules:\n" + "\n".join(bad)
