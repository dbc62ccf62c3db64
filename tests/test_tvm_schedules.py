"""Our TVM CPU schedule rules: each scheduled kernel computes what the unscheduled one does, on
odd shapes too, and the rules leave no kernel of a zoo model to TVM's naive loop nests."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.script import relax as R

from backends import tvm_schedules as ts
from optim.kernels import host_target


def _kernel(build_body, inputs: dict):
    """The one PrimFunc Relax makes from `build_body(*vars)` (after fusion), and the target."""
    bb = relax.BlockBuilder()
    vars_ = [relax.Var(n, R.Tensor(s, dt)) for n, (s, dt) in inputs.items()]
    with bb.function("main", vars_):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, *vars_))
        bb.emit_func_output(out)
    target = tvm.target.Target(host_target())
    with target:
        mod = relax.get_pipeline("zero")(bb.get())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1, "expected the ops to fuse into one kernel"
    return funcs[0], target


def _run(func, target, args):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    tensors = [tvm.runtime.tensor(a) for a in args]
    out = tvm.runtime.tensor(np.zeros([int(s) for s in func.params[-1].shape],
                                      str(func.params[-1].dtype)))
    lib(*tensors, out)
    return out.numpy()


def _check(func, target, rule, args, atol=1e-4):
    sch = rule.apply(func, target, False)
    assert sch is not None, f"{type(rule).__name__} declined the kernel"
    got = _run(sch.mod["main"], target, args)
    want = _run(func, target, args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
    return sch


@pytest.mark.parametrize("m,n,k", [(64, 48, 32), (7, 13, 5), (33, 100, 17)])
@pytest.mark.parametrize("config", [None, ts.MatmulConfig(6, 16, True),
                                    ts.MatmulConfig(2, 32, False)])
def test_dense_with_bias_and_gelu_epilogue_matches(m, n, k, config):
    def body(bb, x, w, b):
        y = bb.emit(R.add(R.matmul(x, w), b))
        return bb.emit(R.multiply(y, R.sigmoid(y)))

    func, target = _kernel(body, {"x": ((m, k), "float32"), "w": ((k, n), "float32"),
                                  "b": ((n,), "float32")})
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((m, k), (k, n), (n,))]
    found = ts.find_matmul(tvm.s_tir.Schedule(func))
    assert found is not None and found[2].m == m and found[2].n == n and found[2].k == k
    configs = {ts.workload_key(func): config} if config else {}
    _check(func, target, ts.Matmul(configs), args)


def test_batched_matmul_with_mask_epilogue_matches():
    def body(bb, q, kt, mask):
        s = bb.emit(R.multiply(R.matmul(q, kt), relax.const(0.125, "float32")))
        return bb.emit(R.add(s, R.where(mask, relax.const(0.0, "float32"),
                                         relax.const(-1e9, "float32"))))

    shapes = {"q": ((2, 3, 20, 8), "float32"), "kt": ((2, 3, 8, 20), "float32"),
              "mask": ((2, 1, 20, 20), "bool")}
    func, target = _kernel(body, shapes)
    rng = np.random.default_rng(1)
    args = [rng.standard_normal(shapes["q"][0]).astype("float32"),
            rng.standard_normal(shapes["kt"][0]).astype("float32"),
            rng.random(shapes["mask"][0]) > 0.3]
    args += [np.array(0.0, "float32"), np.array(-1e9, "float32")]  # where's constants: params
    assert len(args) == len(func.params) - 1
    _check(func, target, ts.Matmul(), args)


@pytest.mark.parametrize("length", [128, 384, 100])
def test_softmax_and_layer_norm_rows_match(length):
    rng = np.random.default_rng(2)
    func, target = _kernel(lambda bb, x: bb.emit(R.nn.softmax(x, axis=-1)),
                           {"x": ((4, 6, length), "float32")})
    x = rng.standard_normal((4, 6, length)).astype("float32")
    if length % ts.VECTOR_LANES:  # rows that do not split into vectors: the rule declines
        assert ts.RowReduction().apply(func, target, False) is None
        return
    _check(func, target, ts.RowReduction(), [x])
    func, target = _kernel(lambda bb, x, g, b: bb.emit(R.nn.layer_norm(x, g, b, axes=[-1])),
                           {"x": ((4, 6, length), "float32"), "g": ((length,), "float32"),
                            "b": ((length,), "float32")})
    g, b = (rng.standard_normal(length).astype("float32") for _ in range(2))
    _check(func, target, ts.RowReduction(), [x, g, b])


def test_injective_chain_and_split_match():
    def body(bb, x):
        t = bb.emit(R.permute_dims(R.reshape(x, (4, 10, 6)), [0, 2, 1]))
        parts = bb.emit(R.split(R.add(t, relax.const(1.0, "float32")), 2, axis=1))
        return bb.emit(R.add(parts[0], parts[1]))

    func, target = _kernel(body, {"x": ((40, 6), "float32")})
    x = np.random.default_rng(3).standard_normal((40, 6)).astype("float32")
    _check(func, target, ts.Injective(), [x])


def test_matmul_rule_declines_a_second_reduction():
    from tvm import te

    x = te.placeholder((16, 8), "float32", name="x")
    w = te.placeholder((8, 16), "float32", name="w")
    r = te.reduce_axis((0, 8), name="r")
    y = te.compute((16, 16), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="y")
    c = te.reduce_axis((0, 16), name="c")
    rows = te.compute((16,), lambda i: te.sum(y[i, c], axis=c), name="rows")
    func = te.create_prim_func([x, w, rows])
    assert ts.Matmul().apply(func, tvm.target.Target(host_target()), False) is None


def test_candidates_fit_the_register_file():
    shape = ts.MatmulShape(batch=1, m=1024, n=384, k=384, dtype="f32", batched_rhs=False)
    for c in ts.candidates(shape):
        accumulators = c.mr * c.nr // ts.VECTOR_LANES
        assert accumulators + c.nr // ts.VECTOR_LANES + 1 <= 16  # AVX2: 16 ymm registers
    assert ts.default_config(shape) in ts.candidates(shape)


# dynamic shapes: kernels whose batch or length is a TIR variable, run at several sizes

def _run_symbolic(func, target, args, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros(out_shape, str(func.params[-1].dtype)))
    lib(*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


def _check_symbolic(func, scheduled, target, args, out_shape):
    want = _run_symbolic(func, target, args, out_shape)
    np.testing.assert_allclose(_run_symbolic(scheduled, target, args, out_shape), want,
                               rtol=1e-4, atol=1e-4)


def _symbolic_dense():
    m = tirx.Var("m", "int64")

    def body(bb, x, w, b):
        return bb.emit(R.add(R.matmul(x, w), b))

    func, target = _kernel(body, {"x": ((m, 48), "float32"), "w": ((48, 40), "float32"),
                                  "b": ((40,), "float32")})
    return func, target


def _dense_args(m: int):
    rng = np.random.default_rng(m)
    return [rng.standard_normal(s).astype("float32") for s in ((m, 48), (48, 40), (40,))]


def test_symbolic_rows_matmul_matches_at_every_size():
    func, target = _symbolic_dense()
    shape = ts.find_matmul(tvm.s_tir.Schedule(func))[2]
    assert shape.m == ts.SYMBOLIC and shape.symbolic and shape.key().startswith("b1-m?-n40")
    scheduled = ts.Matmul().apply(func, target, False).mod["main"]
    for m in (1, 5, 64, 203):  # below one row tile, ragged, whole tiles, ragged and large
        _check_symbolic(func, scheduled, target, _dense_args(m), (m, 40))


def test_dispatch_runs_each_buckets_tile_and_matches():
    func, target = _symbolic_dense()
    small, large = ts.MatmulConfig(2, 8, True), ts.MatmulConfig(6, 16, True)
    most = 16 * 40 * 48  # work of 16 rows
    dispatch = ts.Dispatch(((most, small), (None, large)))
    key = ts.workload_key(func)
    scheduled = ts.Matmul({key: dispatch}).apply(func, target, False)[0].mod["main"]
    text = scheduled.script()
    assert text.count("T.unroll(T.int64(2))") and text.count("T.unroll(T.int64(6))"), \
        "both tiles are in the kernel"
    for m in (3, 16, 17, 200):  # both sides of the switch
        _check_symbolic(func, scheduled, target, _dense_args(m), (m, 40))


def test_symbolic_attention_scores_softmax_and_transpose_match():
    s = tirx.Var("s", "int64")
    rng = np.random.default_rng(5)

    def scores(bb, q, kt):
        return bb.emit(R.multiply(R.matmul(q, kt), relax.const(0.125, "float32")))

    func, target = _kernel(scores, {"q": ((2, 3, s, 8), "float32"),
                                    "kt": ((2, 3, 8, s), "float32")})
    scheduled = ts.Matmul().apply(func, target, False).mod["main"]
    softmax, _ = _kernel(lambda bb, x: bb.emit(R.nn.softmax(x, axis=-1)),
                         {"x": ((2, 3, s, s), "float32")})
    rows = ts.RowReduction().apply(softmax, target, False).mod["main"]
    move, _ = _kernel(lambda bb, x: bb.emit(R.permute_dims(x, [0, 2, 1, 3])),
                      {"x": ((2, s, 3, 8), "float32")})
    moved = ts.Injective().apply(move, target, False).mod["main"]
    for n in (1, 9, 40):
        q, kt = (rng.standard_normal(sh).astype("float32") for sh in ((2, 3, n, 8),
                                                                      (2, 3, 8, n)))
        _check_symbolic(func, scheduled, target, [q, kt], (2, 3, n, n))
        x = rng.standard_normal((2, 3, n, n)).astype("float32")
        _check_symbolic(softmax, rows, target, [x], (2, 3, n, n))
        x = rng.standard_normal((2, n, 3, 8)).astype("float32")
        _check_symbolic(move, moved, target, [x], (2, 3, n, 8))
