"""A separate process that loads saved models and calls them with the inputs it is sent, so a
backend that crashes (a segfault in compiled code, an abort) fails one fuzz case instead of
killing the test run. The parent (`Worker`) restarts it after a crash or a hang."""

from __future__ import annotations

import multiprocessing

import torch

CALL_SECONDS = 60


def _describe(out) -> list:
    leaves = out if isinstance(out, (tuple, list)) else \
        list(out.values()) if isinstance(out, dict) else [out]
    return [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def serve(conn, saves: dict) -> None:
    torch.set_num_threads(1)
    import optim
    from optim.errors import OptimError

    models = {key: optim.load(path, trust_compiled_code=True) for key, path in saves.items()}
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        key, args, kwargs = message
        try:
            conn.send(("ok", _describe(models[key](*args, **kwargs))))
        except OptimError as e:
            conn.send(("optim", type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001  (reported to the parent, which fails the case)
            conn.send(("other", type(e).__name__, str(e)[:500]))


class Worker:
    """`call(key, args, kwargs)` -> ("ok", shapes) | ("optim", type, message) |
    ("other", type, message) | ("crash", exit code, "") | ("hang", seconds, "")."""

    def __init__(self, saves: dict):
        self.saves, self.proc = saves, None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, self.saves), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the input-fuzz worker did not start")

    def call(self, key: str, args: tuple, kwargs: dict) -> tuple:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send((key, args, kwargs))
            if not self.conn.poll(CALL_SECONDS):
                self.close()
                return ("hang", CALL_SECONDS, "")
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.proc = None
            return ("crash", code, "")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
            self.proc = None
