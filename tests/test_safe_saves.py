"""Saves a hostile or unlucky world cannot turn against the user: loading runs nothing from the
directory (no unpickling, no shared library unless trusted), every file is checked against the
checksum the save recorded (the error names the file), paths stay inside the save, and
replacing a save is atomic with leftovers of killed writers cleaned up (issue 23, items 1, 6, 9).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from factories import TinyMLP

import optim
from optim import saving
from optim.errors import OptimError

X = torch.randn(2, 8)
_SAVED = {}


def _saved(tmp_path, backend="onnxruntime", name="m"):
    """A fresh copy of one save per backend (built once per test session)."""
    if backend not in _SAVED:
        om = optim.optimize(TinyMLP(), "cpu", (X,), pipeline="cleanup", backend=backend,
                            measure_latency=False)
        root = tmp_path.parent / f"saved-{backend}"
        om.save(root)
        _SAVED[backend] = root
    shutil.copytree(_SAVED[backend], tmp_path / name)
    return tmp_path / name


def _rehash(directory):
    """What an attacker who edits a save would do: record the new files' checksums."""
    found = json.loads((directory / "manifest.json").read_text())
    found["files"] = saving.checksums(directory)
    (directory / "manifest.json").write_text(json.dumps(found))


class _Payload:
    """Unpickling this writes a marker file: the proof that a load executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_round_trip_is_data_only(backend, tmp_path):
    d = _saved(tmp_path, backend)
    names = sorted(p.name for p in d.iterdir())
    assert not [n for n in names if n.endswith((".pt2", ".pt", ".pkl", ".bin", ".so"))], names
    for path in d.iterdir():  # no pickle stream anywhere (protocol 2+ starts with 0x80)
        assert not path.read_bytes().startswith(b"\x80"), path.name
    torch.testing.assert_close(optim.load(d)(X), TinyMLP()(X), atol=1e-5, rtol=1e-5)


def test_a_pickled_program_from_an_older_save_is_refused_unexecuted(tmp_path):
    d = _saved(tmp_path, "torch")
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, d / "program.pt2")
    found = json.loads((d / "manifest.json").read_text())
    found["artifact"] = "program.pt2"
    del found["program"]
    (d / "manifest.json").write_text(json.dumps(found))
    _rehash(d)
    with pytest.raises(OptimError, match="pickled program.pt2, not loaded"):
        optim.load(d)
    assert not marker.exists()


def test_a_compiled_library_loads_only_when_trusted(tmp_path):
    """A save that claims tvm and carries a library whose constructor writes a file: refused
    without trust_compiled_code, and nothing runs."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the payload library")
    d = _saved(tmp_path, "onnxruntime")
    marker = tmp_path / "pwned"
    src = tmp_path / "payload.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(d / "model.so")], check=True)
    found = json.loads((d / "manifest.json").read_text())
    found.update(backend="tvm", artifact="model.so", params="model.onnx")
    (d / "manifest.json").write_text(json.dumps(found))
    _rehash(d)
    with pytest.raises(OptimError, match="compiled tvm library.*trust_compiled_code=True"):
        optim.load(d)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname"])
def test_the_manifest_cannot_point_outside_the_save(tmp_path, name):
    d = _saved(tmp_path)
    (tmp_path / "outside.onnx").write_bytes((d / "model.onnx").read_bytes())
    found = json.loads((d / "manifest.json").read_text())
    found["artifact"] = name
    (d / "manifest.json").write_text(json.dumps(found))
    with pytest.raises(OptimError, match="outside the save|not a relative path"):
        optim.load(d)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(directory, edit):
    found = json.loads((directory / "manifest.json").read_text())
    edit(found)
    (directory / "manifest.json").write_text(json.dumps(found))


@pytest.mark.parametrize("damage,message", [
    (lambda d: _flip(d / "model.onnx"), "model.onnx has changed"),
    (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:100]),
     "model.onnx has changed"),
    (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    (lambda d: _flip(d / "report.json"), "report.json has changed"),
    (lambda d: (d / "extra.onnx").write_bytes(b"x"), "extra.onnx was not part of the save"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json cannot be read"),
    (lambda d: (d / "manifest.json").write_text("[]"), "unknown save format"),
    (lambda d: (d / "manifest.json").write_text('{"format": "optim.saved/1"}'),
     "records no checksums"),
    (lambda d: _edit_manifest(d, lambda m: m["shapes"]["ranges"].update(batch=[1])),
     "manifest.json: shapes.ranges.batch: .* is too short"),
    (lambda d: _edit_manifest(d, lambda m: m.update(in_spec='[1, {"type": null}]')),
     "the manifest is damaged"),  # both found by fuzzing (tests/fuzz)
])
def test_damaged_saves_are_refused_naming_the_file(tmp_path, damage, message):
    d = _saved(tmp_path)
    damage(d)
    with pytest.raises(OptimError, match=message):
        optim.load(d)


def test_a_model_file_swapped_in_from_another_save_is_caught(tmp_path):
    d = _saved(tmp_path)
    other = optim.optimize(torch.nn.Sequential(torch.nn.Linear(8, 4)), "cpu", (X,),
                           pipeline="cleanup", backend="onnxruntime", measure_latency=False)
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.onnx", d / "model.onnx")
    with pytest.raises(OptimError, match="model.onnx has changed"):
        optim.load(d)


def test_a_failed_save_leaves_the_old_one_whole(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    before = saving.checksums(d)
    om = optim.load(d)

    def broken(self, directory):
        (directory / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(type(om.artifact), "save", broken)
    with pytest.raises(KeyboardInterrupt):
        om.save(d)
    assert saving.checksums(d) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".optim-")] == []
    optim.load(d)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_writers_are_cleaned_and_a_moved_save_restored(tmp_path):
    d = _saved(tmp_path)
    pid = _dead_pid()
    junk = tmp_path / f".optim-save-m-{pid}-abc"
    junk.mkdir()
    (junk / "model.onnx").write_bytes(b"0" * 1000)
    live = tmp_path / f".optim-save-m-{os.getpid()}-xyz"  # a writer still running: kept
    live.mkdir()
    om = optim.load(d)
    om.save(d)
    assert not junk.exists() and live.exists()
    # a writer killed between its two renames: the old save sits aside, the new one not in place
    aside = tmp_path / f".optim-old-m-{pid}-def"
    aside.mkdir()
    d.rename(aside / "save")
    om.save(tmp_path / "m2")  # any save beside it does not touch another name's leftovers
    assert aside.exists()
    om.save(d)  # the next save of `m` puts it back before replacing it, then removes it
    assert not aside.exists()
    optim.load(d)
