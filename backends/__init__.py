"""optim's backends. Importing this package registers each one in `optim.registry.BACKENDS`."""

from backends import onnxruntime, pytorch, tvm  # noqa: F401
