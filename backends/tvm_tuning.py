"""Measured choice of matmul schedules for the tvm backend, kept in a tuning database.

For every matmul workload of a module (a fused PrimFunc with one matmul block, see
`tvm_schedules.Matmul`) the tuner builds each candidate register tile from
`tvm_schedules.candidates`, times them on random inputs here, interleaved round by round (the
machine is shared: a slow moment hits every candidate alike), and records the fastest.

The database is one JSON file per (TVM version, target) under `$OPTIM_CACHE_DIR/tvm/`, keyed by
the workload's structural hash. It is rewritten atomically after each workload, so an
interrupted run keeps what it finished and the next run resumes; a later build with the same
workloads reads the choices back without measuring. A file that is not valid JSON, has another
schema or fails its checksum is set aside as `*.corrupt` and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from backends import tvm_schedules as ts
from optim.files import locked, write_json

SCHEMA = "optim.tvm-tuning/1"
ROUNDS = 7  # timing rounds per candidate; the median is kept
PRUNE_AFTER, PRUNE_RATIO = 2, 1.5  # after 2 rounds, drop candidates 1.5x slower than the best


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIM_CACHE_DIR", Path.home() / ".cache" / "optim")) / "tvm"


class TuningDB:
    """The records of one target: workload key → {shape, config, ms, candidates}."""

    def __init__(self, target: dict, directory: Path | None = None):
        import tvm

        self.header = {"schema": SCHEMA, "tvm": tvm.__version__, "target": target}
        digest = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()
        self.path = (directory or cache_dir()) / f"tuning-{digest[:16]}.json"
        self.records: dict[str, dict] = {}
        self.state = "new"
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        records = self._read()
        if records is None:
            bad = self.path.with_suffix(".corrupt")
            self.path.replace(bad)
            warnings.warn(f"tvm tuning database {self.path} failed its checks (unreadable, other "
                          f"schema or bad checksum); moved to {bad.name}, tuning again",
                          stacklevel=3)
            self.state = "rebuilt (corrupt file set aside)"
            return
        self.records, self.state = records, "loaded"

    def _read(self) -> dict | None:
        """The file's records if it passes its checks, else None."""
        try:
            data = json.loads(self.path.read_text())
            records = data["records"]
            ok = (data.get("schema") == SCHEMA and data.get("header") == self.header
                  and data.get("checksum") == _checksum(records) and isinstance(records, dict))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return records if ok else None

    def get(self, key: str) -> ts.MatmulConfig | None:
        rec = self.records.get(key)
        return ts.MatmulConfig(**rec["config"]) if rec else None

    def put(self, key: str, record: dict) -> None:
        """Add a record: under the file's lock, merged into what other processes wrote since
        this one read it, written atomically (a killed run leaves the old file or the new)."""
        with locked(self.path):
            on_disk = self._read() if self.path.exists() else None
            self.records = {**(on_disk or {}), **self.records, key: record}
            write_json(self.path, {"schema": SCHEMA, "header": self.header,
                                   "checksum": _checksum(self.records),
                                   "records": self.records}, indent=1)


def _checksum(records: dict) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def matmul_workloads(mod) -> dict:
    """workload key → (PrimFunc, MatmulShape) for every matmul function of `mod`."""
    from tvm import s_tir, tirx

    found = {}
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            hit = ts.find_matmul(s_tir.Schedule(func))
            if hit is not None:
                found[ts.workload_key(func)] = (func, hit[2])
    return found


def tune(mod, target, db: TuningDB, measure: bool = True, budget_s: float | None = None,
         progress: Callable[[str], None] | None = None,
         buckets: list[dict] | None = None) -> tuple[dict, dict]:
    """Choose a config for every matmul workload of `mod`: from `db` when recorded, else (if
    `measure`) by measuring the candidates while `budget_s` lasts, else the untuned default.
    The budget is checked between workloads. A workload with symbolic extents (a dynamic
    batch or length) is measured at each of `buckets` ({"label", "vars": {TIR var name:
    size}}) and gets a `Dispatch` when the buckets' best tiles differ. Returns (workload key →
    MatmulConfig or Dispatch, summary)."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    work = matmul_workloads(mod)
    configs, hits, tuned, skipped, dispatched, total = {}, 0, 0, 0, 0, 0
    for n, (key, (func, shape)) in enumerate(work.items(), 1):
        points = _bucket_points(func, buckets) if shape.symbolic else [(None, key, None)]
        total += len(points)
        chosen = {}
        for label, point_key, point in points:
            cached = db.get(point_key)
            if cached is not None:
                chosen[label], hits = cached, hits + 1
                continue
            if not measure or (budget_s is not None and time.perf_counter() - t0 > budget_s):
                skipped += 1
                continue
            at = f" at {label}" if label else ""
            say(f"tuning matmul {n}/{len(work)}: {shape.key()}{at}")
            times = measure_candidates(func, shape, target, point[1] if point else None)
            best = chosen[label] = min(times, key=times.get)
            ms = {c.key(): round(t * 1e3, 4) for c, t in times.items()}
            db.put(point_key, {"shape": shape.key(), "bucket": label, "config": best.as_dict(),
                               "ms": ms[best.key()],
                               "default_ms": ms.get(ts.default_config(shape).key()),
                               "candidates": ms})
            tuned += 1
        if shape.symbolic and len(chosen) == len(points):
            configs[key] = _dispatch([(w, chosen[label]) for label, _, (w, _) in points])
            dispatched += isinstance(configs[key], ts.Dispatch)
        elif not shape.symbolic and None in chosen:
            configs[key] = chosen[None]
    state = ("untuned" if hits + tuned == 0 else "tuned (cache hit)" if hits == total
             else "partially tuned" if skipped else "tuned")
    # counts are of points: a symbolic workload is measured once per bucket
    return configs, {"state": state, "workloads": len(work), "points": total, "from_cache": hits,
                     "tuned_now": tuned, "left_default": skipped,
                     "buckets": [b["label"] for b in buckets or []],
                     "dispatched_per_bucket": dispatched, "database": str(db.path),
                     "database_state": db.state,
                     "seconds": round(time.perf_counter() - t0, 2)}


def _bucket_points(func, buckets: list[dict] | None) -> list[tuple]:
    """(label, database key, (work, var values)) of a symbolic workload at each bucket."""
    out = []
    for b in buckets or []:
        values = _var_values(func, b)
        ana = _bound(values)
        size = int(ana.simplify(ts.matmul_work(func)))
        out.append((b["label"], f"{ts.workload_key(func)}@{size}", (size, values)))
    return out


def _bound(values: dict):
    """An analyzer that knows the shape variables' values (as int64: a Python int would be
    bound as int32 and a product of sizes could overflow)."""
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    ana = Analyzer()
    for var, size in values.items():
        ana.bind(var, tirx.IntImm("int64", size))
    return ana


def _var_values(func, bucket: dict) -> dict:
    """The shape variables of `func`'s parameters at `bucket`: by name from its "vars"; a
    data-dependent size named after an axis ("seq_…": remove_padding's trimmed length) at that
    axis's size; any other (a count of real tokens) at its "tokens"."""
    from tvm import tirx

    found = {}
    for p in func.params:
        dims = list(p.shape) if _is_buffer(p) else [p]
        for d in dims:
            for v in tirx.analysis.undefined_vars(d) if not isinstance(d, int) else []:
                axis = v.name.split("_")[0]
                size = bucket["vars"].get(v.name, bucket.get("axes", {}).get(axis,
                                                                              bucket.get("tokens")))
                if size is not None:
                    found[v] = size
    return found


def _dispatch(points: list[tuple[int, ts.MatmulConfig]]):
    """One config when every bucket chose it; else a Dispatch switching at the geometric
    middle between neighbouring buckets' work."""
    points = sorted(points, key=lambda p: p[0])
    if len({c for _, c in points}) == 1:
        return points[0][1]
    choices = []
    for (w, c), nxt in zip(points, points[1:] + [None]):
        most = None if nxt is None else int((w * nxt[0]) ** 0.5)
        if choices and choices[-1][1] == c:
            choices[-1] = (most, c)
        else:
            choices.append((most, c))
    return ts.Dispatch(tuple(choices))


def measure_candidates(func, shape: ts.MatmulShape, target,
                       values: dict | None = None) -> dict[ts.MatmulConfig, float]:
    """Median seconds of each candidate schedule of `func` on random inputs, timed in
    interleaved rounds; candidates far behind after the first rounds are dropped (their median
    is over the rounds they ran). The default config is always among them. `values` binds
    the shape variables of a symbolic workload (the kernel stays symbolic; the inputs have
    those sizes)."""
    import tvm
    from tvm import s_tir

    configs = ts.candidates(shape)
    if ts.default_config(shape) not in configs:
        configs.append(ts.default_config(shape))
    scheduled = {}
    for cfg in configs:
        sch = s_tir.Schedule(func)
        main, others, _ = ts.find_matmul(sch)
        try:
            ts.schedule_matmul(sch, main, others, shape, cfg)
        except (s_tir.ScheduleError, ts.ScheduleRuleMiss):
            continue
        name = f"candidate{len(scheduled)}"
        scheduled[cfg] = (name, sch.mod["main"].with_attr("global_symbol", name))
    # one module for all candidates: one LLVM compile instead of one per candidate
    lib = tvm.compile(tvm.IRModule({n: f for n, f in scheduled.values()}), target=target)
    built = {cfg: lib[name] for cfg, (name, _) in scheduled.items()}
    args = _random_args(func, values or {})
    times: dict[ts.MatmulConfig, list[float]] = {k: [] for k in built}
    for fn in built.values():
        fn(*args)  # warm-up: first-call page faults and thread-pool start
    alive = dict(built)
    for n in range(ROUNDS):
        for key, fn in alive.items():
            t = time.perf_counter()
            fn(*args)
            times[key].append(time.perf_counter() - t)
        if n + 1 == PRUNE_AFTER:  # clear losers stop costing time (an LM head: seconds a call)
            best = min(min(v) for v in times.values())
            alive = {k: f for k, f in alive.items() if min(times[k]) <= PRUNE_RATIO * best}
    return {k: float(np.median(v)) for k, v in times.items()}


def _random_args(func, values: dict) -> list:
    import tvm

    ana = _bound(values)
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        if not _is_buffer(p):  # a shape variable passed on its own
            args.append(int(ana.simplify(p)))
            continue
        shape, dtype = [int(ana.simplify(s)) for s in p.shape], str(p.dtype)
        if dtype == "bool":
            a = rng.random(shape) > 0.1
        elif dtype.startswith(("int", "uint")):
            a = rng.integers(-100 if dtype.startswith("int") else 0, 100, shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(np.asarray(a), tvm.cpu()))
    return args


def _is_buffer(param) -> bool:
    """A tensor parameter (0-d included), not a shape variable passed as a scalar."""
    return getattr(param, "shape", None) is not None
