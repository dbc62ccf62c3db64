"""optim: a compiler-style optimization toolchain for PyTorch transformers.

    import optim
    fast = optim.optimize(model, target="cpu", example_inputs=(input_ids,))
    fast(input_ids); fast.report; fast.save("out/"); optim.load("out/")

This package owns the IR and its data types at the bottom (`errors`, `ir`, `ops`, `kernels`,
`bits`, `pass_base`, `registry`, `pipeline`, `numerics`, `measure`, `host_memory`), the zoo of
models, data sets and tasks (`optim.zoo`), and the driver at the top (`api`, `capture`,
`transform`, `lower`, `verify`, `timing`, `report`, `targets`, `saving`, `cli`, ...). Modules at
the bottom import nothing above them; `hardware`, `passes` and `backends` sit between, and only
the driver imports all of them (tests/test_import_direction.py checks it).

The public names below load lazily, so `import optim.errors` (as `hardware` and `passes` do)
does not pull in the driver.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "optimize": "optim.api", "load": "optim.api", "OptimizedModel": "optim.model",
    "OptimizedDecoder": "optim.decoder",
    "compare_targets": "optim.compare", "Pipeline": "optim.pipeline", "Report": "optim.report",
    "numerics": "optim.numerics", "encode": "optim.embeddings", "ShapeError": "optim.shapes",
    "OptimError": "optim.errors", "CaptureError": "optim.errors", "ConfigError": "optim.errors",
    "PassError": "optim.errors", "NumericsError": "optim.errors", "BackendError": "optim.errors",
    "UnknownNameError": "optim.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'optim' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    value = module if name == "numerics" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
