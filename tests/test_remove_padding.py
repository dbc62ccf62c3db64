"""remove_padding end to end on the real MiniLM: the packed graph equals the padded one at real
tokens (within 1e-4, fp32) on batches with very uneven lengths, one-token rows and rows at the
model's maximum length, on the torch graph and through ONNX Runtime and TVM (also after
loading, in this process and a fresh one); the
cost model charges the real tokens. The pass on small graphs: tests/passes/."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import optim
from hardware.estimate import estimate
from optim import numerics
from optim.targets import resolve_target
from optim.testing import capture_example, run_pass
from optim.timing import kernels_at


@pytest.fixture(scope="module")
def minilm():
    from optim import zoo

    return zoo.load("minilm", batch=4, seq=32)


def _batch(z, lengths: list[int], seq: int) -> dict:
    """Real token ids for every row, with row i's mask 1 on its first lengths[i] positions."""
    from optim.zoo.data import sentences

    enc = z.tokenizer(sentences(len(lengths), seed=11), padding="max_length", truncation=True,
                      max_length=seq, return_tensors="pt")
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": enc["input_ids"], "attention_mask": mask}


BATCHES = {
    "uneven": ([40, 1, 7, 13, 40, 25], 40),
    "uneven, longest below the padded length": ([3, 1, 30, 9], 64),
    "one token each": ([1, 1, 1], 16),
    "maximum length": ([512, 512], 512),
}


def _assert_same_at_real_tokens(ref, got, mask, label: str):
    keep = mask.bool()
    fid = numerics.compare(ref, got, mask)
    assert fid["max_abs_error"] <= 1e-4, (label, fid)
    hidden = got["last_hidden_state"] if isinstance(got, dict) else got.last_hidden_state
    assert hidden[~keep].abs().max().item() == 0 if (~keep).any() else True


@pytest.fixture(scope="module")
def graphs(minilm):
    """MiniLM captured with dynamic shapes: fused (padded) and after remove_padding."""
    gm = capture_example(minilm.model, (), minilm.example_kwargs, dynamic=True)
    return run_pass("fuse_attention", gm, (), minilm.example_kwargs).gm, \
        run_pass("remove_padding", gm, (), minilm.example_kwargs)


def test_packed_graph_equals_padded_graph_at_real_tokens(minilm, graphs):
    run = graphs[1]
    assert run.result.counts["ops_packed"] >= 6 * 8  # every layer's linears, norms and adds
    assert run.result.counts["attention_trimmed"] == 6
    assert all(c["max_abs_error"] <= 1e-4 for c in run.result.details["checks"])
    for label, (lengths, seq) in BATCHES.items():
        kwargs = _batch(minilm, lengths, seq)
        with torch.no_grad():
            _assert_same_at_real_tokens(minilm.model(**kwargs), run.gm(**kwargs),
                                        kwargs["attention_mask"], label)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_packed_model_runs_through_a_backend_and_reloads(minilm, tmp_path, backend):
    om = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                        pipeline="cleanup,fuse_attention,remove_padding",
                        backend=backend, measure_latency=False)
    assert om.report["model"]["shapes"]["ranges"] == {"batch": [1, 1024], "seq": [1, 512]}
    om.save(tmp_path / "m")
    loaded = optim.load(tmp_path / "m", trust_compiled_code=True)  # our own save
    for label, (lengths, seq) in BATCHES.items():
        kwargs = _batch(minilm, lengths, seq)
        with torch.no_grad():
            ref = minilm.model(**kwargs)
        _assert_same_at_real_tokens(ref, om(**kwargs), kwargs["attention_mask"], label)
        _assert_same_at_real_tokens(ref, loaded(**kwargs), kwargs["attention_mask"],
                                    f"{label}, loaded")
    # and in a fresh process, which has only the saved files (the custom ops register on import)
    kwargs = _batch(minilm, *BATCHES["uneven"])
    for name, t in kwargs.items():
        np.save(tmp_path / f"{name}.npy", t.numpy())
    script = textwrap.dedent(f"""
        import numpy as np, torch, optim
        om = optim.load({str(tmp_path / "m")!r}, trust_compiled_code=True)
        kw = {{n: torch.from_numpy(np.load({str(tmp_path)!r} + f"/{{n}}.npy"))
              for n in ("input_ids", "attention_mask")}}
        np.save({str(tmp_path / "out.npy")!r}, om(**kw).last_hidden_state.numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    with torch.no_grad():
        ref = minilm.model(**kwargs).last_hidden_state
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    _assert_same_at_real_tokens({"last_hidden_state": ref}, {"last_hidden_state": got},
                                kwargs["attention_mask"], "uneven, loaded in a fresh process")


def _estimate_ms(kernels, target: str) -> float:
    t = resolve_target(target)
    return estimate(kernels, t.spec, t.calibration).seconds * 1e3


def test_cost_model_charges_real_tokens_and_the_trimmed_attention(minilm, graphs):
    padded, packed = graphs[0], graphs[1].gm
    small = _batch(minilm, [20, 3, 9, 14], 128)  # 46 real tokens of 512, longest 20
    kernels = kernels_at(packed, (), small)
    gemm_rows = {k.shape[1] for k in kernels if k.kind == "gemm"}
    assert 46 in gemm_rows and 512 not in gemm_rows, gemm_rows
    attn = [k.shape for k in kernels if k.kind == "attention"]
    assert attn and all(s[2] == s[3] == 20 for s in attn)
    # at another batch: 64 rows of 5..40 real tokens padded to 128
    large = _batch(minilm, [5 + (7 * i) % 36 for i in range(64)], 128)
    at = {("packed", "small"): kernels, ("packed", "large"): kernels_at(packed, (), large),
          ("padded", "small"): kernels_at(padded, (), small),
          ("padded", "large"): kernels_at(padded, (), large)}
    rows = {k.shape[1] for k in at["packed", "large"] if k.kind == "gemm"}
    assert rows == {int(large["attention_mask"].sum()), 64}, rows  # the pooler: one per row
    gain = {(t, b): _estimate_ms(at["padded", b], t) / _estimate_ms(at["packed", b], t)
            for t in ("xeon-spr", "a100") for b in ("small", "large")}
    assert gain["xeon-spr", "small"] > 2 and gain["xeon-spr", "large"] > 2, gain
    assert gain["a100", "large"] > 1.2, gain
    # four short rows on an A100 are launch-bound: the gathers and scatters cost more kernels
    # than the smaller GEMMs save, and the estimate says so
    assert gain["a100", "small"] < 1, gain
