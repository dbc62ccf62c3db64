"""What a target can actually run fast: which peak a kernel gets, and what a pass can't buy there.

The rule is never to credit a speedup the target cannot deliver:
- a dtype earns its own peak only where the spec lists that peak (int4 on Hopper: none; int8 on
  V100: DP4A, not tensor cores);
- without it, the math runs at the best float peak the target has, the narrower weights still
  cut bytes, and the dequantization is counted;
- 2:4 sparse weights earn x2 (or the spec's measured `speedup`) only for dtypes the spec's
  `sparse_2_4` lists; elsewhere only bytes;
- binary weights earn binary math only where the spec lists a `binary` peak (this CPU: measured
  by the probe); FPGA specs without a sourced LUT rate say so; elsewhere only bytes shrink;
- unstructured sparsity earns nothing above `UNSTRUCTURED_MAX_DENSITY`: the kernel runs dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from hardware.spec import HardwareSpec

FLOAT_ORDER = ("fp16", "bf16", "tf32", "fp32")
# storage bytes relative to dense for 2:4: 2 of 4 values + 2-bit indices (hardware.md note 4)
SPARSE_24_BYTES = {"fp16": 0.5625, "bf16": 0.5625, "int8": 0.625, "fp8": 0.625, "fp32": 0.53125}


# Sparse (CSR-style) kernels beat dense GEMMs only when most weights are zero; above this density
# the weights stay dense. Assumed from the usual cuSPARSE/MKL crossover of 5-10% density.
UNSTRUCTURED_MAX_DENSITY = 0.10
# Sparse kernels reach a fraction of dense GEMM efficiency on the nonzeros (assumed).
UNSTRUCTURED_EFFICIENCY = 0.25


def sparse_scaling(weight_format: str, density: float, dtype: str) -> tuple[float, float, str]:
    """(FLOP factor, weight-byte factor, note) for a kernel's weight format."""
    if weight_format == "2:4":
        return 1.0, SPARSE_24_BYTES.get(dtype, 0.5625), ""
    if weight_format == "unstructured":
        if density > UNSTRUCTURED_MAX_DENSITY:
            return 1.0, 1.0, (f"unstructured density {density:.0%} is above "
                              f"{UNSTRUCTURED_MAX_DENSITY:.0%}: runs as a dense GEMM, no gain")
        value = {"fp32": 4, "fp16": 2, "bf16": 2}.get(dtype, 1)  # bytes per value; +4 B index
        return density / UNSTRUCTURED_EFFICIENCY, density * (value + 4) / value, ""
    return 1.0, 1.0, ""


@dataclass(frozen=True)
class Placement:
    peak_dtype: str  # which peak the math runs at
    peak_flops: float
    sparse_factor: float = 1.0  # x2 when a 2:4 path applies
    note: str = ""  # why it is not the kernel's own dtype


def best_float(spec: HardwareSpec, allow_reduced: bool) -> str:
    order = FLOAT_ORDER if allow_reduced else ("fp32",)
    for d in order:
        if d in spec.peak:
            return d
    return next(iter(spec.peak))


def place(spec: HardwareSpec, dtype: str, *, weight_format: str = "dense",
          precision: str = "graph") -> Placement:
    """The peak a kernel of `dtype` runs at on `spec`, with the reason when it is not its own.

    precision: "graph" runs float math in the graph's dtype; "fp16"/"bf16"/"tf32" say the backend
    runs float GEMMs in that type (the usual GPU deployment)."""
    if dtype in ("fp32", "fp16", "bf16", "tf32") and precision != "graph":
        dtype = precision
    note = ""
    other16 = {"fp16": "bf16", "bf16": "fp16"}.get(dtype)
    own = spec.peak[dtype].value if dtype in spec.peak else 0.0
    if other16 in spec.peak and spec.peak[other16].value > own:
        # 16-bit float math is deployed in whichever 16-bit type the target accelerates
        peak_dtype = other16
        note = f"{spec.name} runs 16-bit float math fastest as {other16}"
    elif dtype in spec.peak:
        peak_dtype = dtype
    else:
        peak_dtype = best_float(spec, allow_reduced=dtype != "fp32")
        if dtype == "binary" and spec.kind == "fpga":  # LUT logic could; no sourced rate
            note = (f"{spec.name} has no sourced binary (LUT XNOR/popcount) rate; binary math "
                    f"is estimated at its {peak_dtype} peak")
        elif dtype in ("int8", "int4", "fp8", "binary"):
            note = (f"{spec.name} has no {dtype} peak; math runs at {peak_dtype} after "
                    f"dequantization, only the weight bytes shrink")
        elif dtype not in ("fp32",):
            note = f"{spec.name} has no {dtype} peak; runs at {peak_dtype}"
    factor = 1.0
    if weight_format == "2:4":
        if peak_dtype in spec.sparse_2_4:
            measured = spec.sparse_2_4_speedup
            factor = measured.value if measured else 2.0
            if measured:
                how = ("measured" if measured.provenance == "measured"
                       else "derived from a measurement")
                note = note or (f"{spec.name}: 2:4 GEMMs credited x{factor:g} ({how}), not the "
                                f"datasheet's x2")
        else:
            note = note or f"{spec.name} has no 2:4 sparse {peak_dtype} path; only bytes shrink"
    if weight_format == "binary" and "binary" not in spec.peak:
        if spec.kind == "fpga":  # LUT logic could; the spec has no sourced LUT rate to use
            note = note or (f"{spec.name} has no sourced binary (LUT XNOR/popcount) rate; "
                            f"binary math is estimated at its {peak_dtype} peak")
        elif "popcount" not in spec.features:
            note = note or f"{spec.name} computes no binary (XNOR/popcount) math; only bytes shrink"
    return Placement(peak_dtype, spec.peak[peak_dtype].value * factor, factor, note)


def pass_advice(spec: HardwareSpec, passes: list[str], precision: str = "graph") -> list[str]:
    """Say, before anyone deploys it, when a pass in the pipeline cannot speed up `spec`."""
    out = []
    if "quantize" in passes:
        p = place(spec, "int8", precision=precision)
        if p.note:
            out.append(f"quantize (int8): {p.note}.")
        elif spec.kind == "gpu" and "int8_tensor_cores" not in spec.features:
            out.append(f"quantize (int8): {spec.name} has no int8 tensor cores; int8 runs on "
                       f"DP4A at {spec.peak['int8'].value / 1e12:.0f} TOP/s.")
        if spec.kind in ("gpu", "tpu") and not p.note:
            out.append(f"quantize (int8): the {spec.name} estimate assumes a backend with int8 "
                       "GEMM kernels (TensorRT, cuBLASLt); optim's torch and onnxruntime "
                       "backends run optim::linear_int8 with CPU kernels only.")
        elif spec.kind == "cpu" and not {"vnni", "amx", "avx512_vnni"} & spec.features:
            out.append(f"quantize (int8): {spec.name} has no VNNI/AMX; int8 GEMMs use AVX2 "
                       "u8s8 madd at most ~2x fp32 and per-token quantization costs a pass "
                       "over the activations (measured here: ~1x, benchmarks/RESULTS.md "
                       "section 1).")
    for name in passes:
        if name in ("sparsify_2_4", "sparsify") and not spec.sparse_2_4:
            out.append(f"{name}: {spec.name} has no 2:4 sparse math; only weight bytes shrink.")
        if name == "binarize" and "popcount" not in spec.features and spec.kind != "fpga":
            out.append(f"binarize: {spec.name} has no popcount path; only weight bytes shrink.")
    return out


def estimate_advice(section: dict) -> list[str]:
    """From one target's estimate (hardware.estimate.report_section): the passes that make the
    model slower there, and why (the bound of the final graph)."""
    out = []
    for st in section.get("stages", [])[1:]:
        gain = st.get("gain_vs_previous")
        if gain is not None and gain < 0.95:
            out.append(f"{st['after']} makes this model slower on {section['target']}: estimated "
                       f"{gain:.2f}x; the graph is {section['bound']}-bound there, so the extra "
                       f"work the pass adds (e.g. quantize/dequantize launches) is not repaid.")
    return out
