"""Caches that survive damage and concurrency: an invalid cpu probe is measured again and
replaced (never a KeyError or ZeroDivisionError later), concurrent writers never tear a file,
and two tunings into one TVM database keep both's records (issue 23, item 8)."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from hardware import cpu_probe
from optim.files import write_json

RATES = {r: 1e9 for r in cpu_probe.RATES}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIM_CACHE_DIR", str(tmp_path))
    calls = []
    # the measurement itself takes seconds and is covered elsewhere; here only the cache logic
    monkeypatch.setattr(cpu_probe, "measure", lambda: calls.append(1) or dict(RATES))
    return tmp_path, calls


@pytest.mark.parametrize("content", ["{}", "[]", "null", "{not json", "",
                                     "MISSING_RATE", "ZERO_RATE", "NAN_RATE", "OTHER_KEY"])
def test_an_invalid_cpu_probe_is_measured_again_and_replaced(cache, content):
    tmp_path, calls = cache
    good = cpu_probe.probe()
    path = tmp_path / f"cpu-{good['cache_key']}.json"
    broken = json.loads(path.read_text())
    edits = {"MISSING_RATE": lambda d: d["measured"].pop("int8_ops"),
             "ZERO_RATE": lambda d: d["measured"].update(fp32_flops=0),
             "NAN_RATE": lambda d: d["measured"].update(read_bytes_per_s=float("nan")),
             "OTHER_KEY": lambda d: d.update(cache_key="0" * 12)}
    if content in edits:
        edits[content](broken)
        content = json.dumps(broken)
    path.write_text(content)
    again = cpu_probe.probe()
    assert len(calls) == 2 and again["measured"] == RATES
    assert cpu_probe._valid(json.loads(path.read_text()), good["cache_key"])
    cpu_probe.probe()
    assert len(calls) == 2  # the replaced file is used from then on


def _hammer(path, tag, n):
    for i in range(n):
        write_json(path, {"writer": tag, "i": i, "pad": "x" * 20000})


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "shared.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, t, 150)) for t in ("a", "b")]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            assert json.loads(path.read_text())["writer"] in ("a", "b")
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert json.loads(path.read_text())["i"] == 149
    assert [f.name for f in tmp_path.iterdir() if f.suffix == ".tmp"] == []


def _tune_one(directory, key):
    from backends.tvm_tuning import TuningDB

    db = TuningDB({"kind": "llvm"}, directory)
    db.put(key, {"config": {}, "ms": 1.0})


def test_two_tunings_into_one_database_keep_both_records(tmp_path):
    pytest.importorskip("tvm")
    from backends.tvm_tuning import TuningDB

    first = TuningDB({"kind": "llvm"}, tmp_path)  # read before the other process writes
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_tune_one, args=(tmp_path, "theirs"))
    p.start()
    p.join()
    assert p.exitcode == 0
    first.put("ours", {"config": {}, "ms": 2.0})
    again = TuningDB({"kind": "llvm"}, tmp_path)
    assert again.state == "loaded" and set(again.records) == {"theirs", "ours"}
