"""optim: a compiler-style optimization toolchain for PyTorch transformers.

    import optim
    fast = optim.optimize(model, target="cpu", example_inputs=(input_ids,))
    fast(input_ids); fast.report; fast.save("out/"); optim.load("out/")
"""

from optim import numerics
from optim.api import OptimizedModel, load, optimize
from optim.compare import compare_targets
from optim.errors import (BackendError, CaptureError, ConfigError, NumericsError, OptimError,
                          PassError, UnknownNameError)
from optim.pipeline import Pipeline
from optim.report import Report

__all__ = ["optimize", "compare_targets", "load", "OptimizedModel", "Pipeline", "Report", "numerics", "OptimError",
           "CaptureError", "ConfigError", "PassError", "NumericsError", "BackendError",
           "UnknownNameError"]
