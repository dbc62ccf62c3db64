"""The user's model as it was: every module's train/eval flag and every buffer restored after
optim has run it (capture, fidelity checks, timing, calibration).

`model.train(was_training)` is not enough: it sets every submodule to one flag, flipping those
the user had set otherwise, and running a model can update buffers in place (running
statistics, caches, counters). Parameters are not copied (they can be most of the memory);
one changed in place is reported as optim's bug instead of passing silently.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from optim.errors import OptimError


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module):
    """Every submodule's train/eval flag as it was, whatever ran in between."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def untouched(model: torch.nn.Module):
    """Modes and buffers (values and objects) as they were on entry, on any exit."""
    buffers = [(m, name, b, _version(b), b.detach().clone())
               for m in model.modules() for name, b in m._buffers.items() if b is not None]
    params = [(name, p, _version(p)) for name, p in model.named_parameters()]
    failed = False
    try:
        with modes_kept(model):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        with torch.no_grad():
            for m, name, b, version, saved in buffers:
                m._buffers[name] = b  # a buffer reassigned is put back
                if version is None or _version(b) != version:
                    b.copy_(saved)
        moved = [name for name, p, version in params
                 if version is not None and _version(p) != version]
        if moved and not failed:
            raise OptimError(f"optim changed parameters of the model in place ({moved[:3]}); "
                             f"this is a bug in optim, please report it")


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: always restored
        return None


def leaves_model_untouched(fn):
    """Decorate `fn(model, ...)` so that `model` comes back as it went in (`untouched`)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, torch.nn.Module):
            return fn(model, *args, **kwargs)
        with untouched(model):
            return fn(model, *args, **kwargs)

    return wrapper
