"""Instruction-level cost model of an FPGA LLM accelerator in the style of FlightLLM (FPGA'24).

    est = estimate_llm(load_spec("alveo-u280"), LLAMA2["llama2-7b"], phase="decode",
                       context_len=512, weight_bits=4, sparsity={"q": 0.3, "k": 0.3})
    est.tokens_per_s, est.bound, est.breakdown()

The accelerator is the one FlightLLM's released profiler describes (FlightLLM/flightllm_test_demo,
profile/config.yaml): one core per SLR, each with a matrix engine (MM for many rows, MV for one),
a vector unit (softmax, norms, eltwise, SiLU), and LD/ST units on its own HBM channels; the ISA
classes are LD, ST, MM, MV, MISC (vector) and SYS (barrier). Every operator of the decoder is
split over the cores by output columns (attention by heads) and cut into tiles, one matrix
instruction each; per tile the modules run as a pipeline (double-buffered), so an operator takes

    t = (n - 1) * max(L, C, V, S) / n + (L + C + V + S) / n + t_sys

with L, C, V, S the load, compute, vector and store busy times of its n tiles: the slowest
module sets the rate and the other modules' first/last tile is the non-overlappable fill and
drain. Operators are separated by a SYS barrier (FlightLLM syncs all SLRs after each layer op).

    L = weight/KV bytes / (channels x channel BW x same-channel eff) + activation bytes /
        (activation channels x channel BW x cross-channel eff)
    C = executed MACs / (DSPs allocated x ops per DSP / 2 x clock); executed MACs include tile
        padding and skip the zero fraction of sparse weights (sparse DSP chains)
    V = element passes / (vector lanes x clock)

There is no global correction factor. FlightLLM's profiler divides every instruction time by
3.2 (`correction_factor`, unexplained in the code); its instruction stream covers the whole
model on one core's parallelism and 8 channels, so we read 3.2 as about 4 SLRs x 0.8. Here the
SLR parallelism is explicit (`cores`), and the losses are explicit and sourced: HBM channel
efficiency (0.70/0.35 from FlightLLM's config), tile padding, pipeline fill/drain, barriers.

Not modelled: HBM access latency and refresh, instruction fetch, host transfers, the card's
DDR4, clock/placement limits, dequantisation and sampling cost, embedding lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hardware.llm_shape import LLMShape
from hardware.spec import HardwareSpec
from optim.errors import ConfigError

PHASES = ("prefill", "decode")
CLASSES = ("LD", "ST", "MM", "MV", "MISC", "SYS")
MODULES = ("load", "compute", "vector", "store", "sync")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
FORMATS = ("auto", "dense", "compressed")
TWO_PASS = 2  # softmax and RMSNorm read their data twice (statistics, then apply), as FlightLLM
ROPE_PASSES = 3  # x*cos, rot(x)*sin, add: FlightLLM's IR fuses three eltwise ops into q and k
_NEEDS = ("ops_per_dsp", "kernel_clock_mhz", "cores", "hbm_channel_gbs", "hbm_channels_per_core",
          "act_channels_per_core", "hbm_same_channel_eff", "hbm_cross_channel_eff",
          "mm_dsps_per_core", "mv_dsps_per_core", "mm_tile_m", "mm_tile_n", "mv_tile_n",
          "vector_lanes", "weight_buffer_mb", "act_buffer_mb", "sparse_group")


@dataclass(frozen=True)
class Design:
    """The accelerator instantiated on the FPGA, from a spec's `fpga:` block (SI units)."""

    clock: float
    cores: int
    mm_dsps: int  # per core
    mv_dsps: int
    ops_per_dsp: dict[str, float]
    mm_tile_m: int
    mm_tile_n: int
    mv_tile_n: int
    vector_lanes: int
    channels: int  # HBM channels per core for weight/KV streams
    stream_bw: float  # B/s per core: channels x channel BW x same-channel efficiency
    act_bw: float  # B/s per core: activation channels x channel BW x cross-channel efficiency
    weight_buffer: float  # B per core (half of it holds the tile being loaded)
    act_buffer: float  # B per core: what always-on-chip decode can keep
    sparse_group: int  # M of N:M; a kept weight carries log2(M) index bits

    @classmethod
    def from_spec(cls, spec: HardwareSpec) -> Design:
        if spec.kind != "fpga":
            raise ConfigError(f"estimate_llm needs an fpga target; {spec.name!r} is a {spec.kind}")
        missing = [k for k in _NEEDS if k not in spec.fpga]
        if missing:
            raise ConfigError(f"{spec.path or spec.name}: fpga block lacks {', '.join(missing)}")
        f = {k: v if isinstance(v, dict) else float(v) for k, v in spec.fpga.items()}
        ch_bw = f["hbm_channel_gbs"]
        return cls(
            clock=f["kernel_clock_mhz"], cores=int(f["cores"]), mm_dsps=int(f["mm_dsps_per_core"]),
            mv_dsps=int(f["mv_dsps_per_core"]),
            ops_per_dsp={k: float(v) for k, v in f["ops_per_dsp"].items()},
            mm_tile_m=int(f["mm_tile_m"]), mm_tile_n=int(f["mm_tile_n"]),
            mv_tile_n=int(f["mv_tile_n"]), vector_lanes=int(f["vector_lanes"]),
            channels=int(f["hbm_channels_per_core"]),
            stream_bw=f["hbm_channels_per_core"] * ch_bw * f["hbm_same_channel_eff"],
            act_bw=f["act_channels_per_core"] * ch_bw * f["hbm_cross_channel_eff"],
            weight_buffer=f["weight_buffer_mb"], act_buffer=f["act_buffer_mb"],
            sparse_group=int(f["sparse_group"]))

    def macs_per_s(self, unit: str, dtype: str) -> float:
        if dtype not in self.ops_per_dsp:
            raise ConfigError(f"this FPGA spec gives no ops_per_dsp for {dtype} "
                              f"(has {', '.join(self.ops_per_dsp)})")
        dsps = self.mm_dsps if unit == "MM" else self.mv_dsps
        return dsps * self.ops_per_dsp[dtype] / 2 * self.clock


@dataclass
class Op:
    """One operator on one core (cores run the same op on their slices in parallel)."""

    name: str
    unit: str | None = None  # "MM" | "MV" | None (vector only)
    dtype: str = "int8"
    tiles: int = 1
    stream_bytes: float = 0.0  # weights, sparse metadata, KV cache: over the core's channels
    act_bytes: float = 0.0  # activations loaded from HBM (when not on chip)
    st_bytes: float = 0.0  # activations and KV appended, stored to HBM
    macs: float = 0.0  # executed: padded, zero weights skipped
    vec: float = 0.0  # element passes on the vector unit
    footprint: float = 0.0  # stored weight bytes of this core's slice (for the capacity check)
    insts: dict[str, int] = field(default_factory=dict)  # per core, SYS excluded
    hbm: dict[str, float] = field(default_factory=dict)  # bytes by kind, per core

    def stages(self, d: Design) -> tuple[float, float, float, float]:
        comp = self.macs / d.macs_per_s(self.unit, self.dtype) if self.unit else 0.0
        return (self.stream_bytes / d.stream_bw + self.act_bytes / d.act_bw, comp,
                self.vec / (d.vector_lanes * d.clock), self.st_bytes / d.act_bw)

    def seconds(self, d: Design, sync: float) -> float:
        st, n = self.stages(d), self.tiles
        return (n - 1) * max(st) / n + sum(st) / n + sync


@dataclass(frozen=True)
class FPGAEstimate:
    target: str
    phase: str
    settings: dict
    seconds: float  # one decode step (every sequence of the batch) or the whole prefill
    tokens_per_s: float  # decode: batch / seconds; prefill: batch * prompt_len / seconds
    bound: str  # the module with the most busy time
    modules: dict[str, float]  # busy seconds per module of one core
    instructions: dict[str, dict[str, float]]  # class -> count (all cores), bytes, cycles
    hbm_bytes: dict[str, float]  # all cores, by kind
    ops: list[dict]  # per operator name, summed over layers
    activations_on_chip: bool
    fits_memory: bool
    design: dict

    @property
    def non_overlapped(self) -> float:
        """Seconds not hidden under the busiest module: fill, drain and barriers."""
        return self.seconds - max(self.modules.values())

    def breakdown(self) -> dict:
        return {"target": self.target, "phase": self.phase, "settings": self.settings,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "bound": self.bound,
                "modules_s": self.modules, "non_overlapped_s": self.non_overlapped,
                "instructions": self.instructions, "hbm_bytes": self.hbm_bytes, "ops": self.ops,
                "activations_on_chip": self.activations_on_chip,
                "fits_memory": self.fits_memory, "design": self.design}


# ------------------------------------------------------------------ the model

@dataclass(frozen=True)
class _Run:
    d: Design
    w_bits: float
    act: float  # bytes per activation element
    kv: float  # bytes per KV element
    density: dict[str, float]
    fmt: str
    on_chip: bool
    dtype: str  # matrix math for weights x activations
    kv_dtype: str  # matrix math for attention

    def weight_bits(self, dens: float) -> tuple[float, float, bool]:
        """Stored bits per weight (values, metadata) and whether the compressed format is used."""
        dense = (self.w_bits, 0.0)
        g = self.d.sparse_group
        comp = (dens * self.w_bits, dens * math.log2(g) + 8 / (g * g))  # + 1 B block info
        use = dens < 1 and (self.fmt == "compressed" or
                            (self.fmt == "auto" and sum(comp) < sum(dense)))
        return (*(comp if use else dense), use)


def _dtype(*bits: float) -> str:
    b = max(bits)
    return "int4" if b <= 4 else "int8" if b <= 8 else "fp16"


def _linear(r: _Run, name: str, K: int, N: int, M: int, vec_passes: int = 0, misc: int = 0,
            kv_store: bool = False) -> Op:
    d, dens = r.d, r.density.get(name, 1.0)
    n_core = math.ceil(N / d.cores)
    # the engine a compiler would pick: MV streams rows through a weight tile, MM pads to tile_m
    mv = M * K * math.ceil(n_core / d.mv_tile_n) * d.mv_tile_n / d.macs_per_s("MV", r.dtype)
    mm = (math.ceil(M / d.mm_tile_m) * d.mm_tile_m * K * math.ceil(n_core / d.mm_tile_n)
          * d.mm_tile_n / d.macs_per_s("MM", r.dtype))
    unit = "MV" if mv <= mm else "MM"
    tile_n = d.mv_tile_n if unit == "MV" else d.mm_tile_n
    m_tiles = 1 if unit == "MV" else math.ceil(M / d.mm_tile_m)
    rows = M if unit == "MV" else m_tiles * d.mm_tile_m
    groups = math.ceil(n_core / tile_n)
    val_bits, meta_bits, comp = r.weight_bits(dens)
    w_bytes = K * n_core * (val_bits + meta_bits) / 8
    k_splits = max(1, math.ceil(K * tile_n * (val_bits + meta_bits) / 8 / (d.weight_buffer / 2)))
    reloads = 1 if w_bytes <= d.weight_buffer / 2 else m_tiles  # weights re-streamed per row tile
    tiles = m_tiles * groups * k_splits
    act_in = 0.0 if r.on_chip else M * K * r.act
    act_out = 0.0 if r.on_chip else M * n_core * r.act
    kv_out = M * n_core * r.kv if kv_store else 0.0
    return Op(name, unit, r.dtype, tiles, stream_bytes=reloads * w_bytes, act_bytes=act_in,
              st_bytes=act_out + kv_out, macs=rows * K * groups * tile_n * dens,
              vec=vec_passes * M * n_core, footprint=w_bytes,
              insts={"LD": tiles * (d.channels + 2 * comp) + (0 if r.on_chip else m_tiles),
                     unit: tiles, "MISC": misc * m_tiles * groups,
                     "ST": (m_tiles if act_out else 0) + (m_tiles if kv_store else 0)},
              hbm={"weights": reloads * K * n_core * val_bits / 8,
                   "metadata": reloads * K * n_core * meta_bits / 8, "kv": kv_out,
                   "activations": act_in + act_out})


def _attention(r: _Run, s: LLMShape, phase: str, batch: int, L: int, ctx: int,
               attn_density: float) -> list[Op]:
    """QK^T with fused softmax, then SV, on each core's share of heads; K and V stream from HBM.
    Decode: one query row per sequence over ctx keys. Prefill: causal, per query tile of
    mm_tile_m rows over the keys up to that tile (scores stay on chip, softmax fused)."""
    d, hd = r.d, s.head_dim
    heads, kvh = math.ceil(s.heads / d.cores), math.ceil(s.kv_heads / d.cores)
    if phase == "decode":
        unit, tile_n, q_rows = "MV", d.mv_tile_n, 1
        key_rows = ctx  # keys read per sequence
        groups_qk = math.ceil(heads * ctx / tile_n)
        tiles = groups_qk
    else:
        unit, tile_n, q_rows = "MM", d.mm_tile_n, d.mm_tile_m
        q_tiles = math.ceil(L / d.mm_tile_m)
        key_rows = sum(min(L, (i + 1) * d.mm_tile_m) for i in range(q_tiles))
        groups_qk = heads * math.ceil(key_rows / tile_n)  # key columns over all query tiles
        tiles = heads * q_tiles
    kv_bytes = batch * kvh * key_rows * hd * r.kv * attn_density
    q_in = 0.0 if r.on_chip else batch * L * heads * hd * r.act
    out = 0.0 if r.on_chip else batch * L * heads * hd * r.act
    qk = Op("attn_qk", unit, r.kv_dtype, batch * tiles, stream_bytes=kv_bytes, act_bytes=q_in,
            macs=batch * q_rows * groups_qk * tile_n * hd * attn_density,
            vec=TWO_PASS * batch * heads * q_rows * key_rows * attn_density,
            insts={"LD": batch * tiles * d.channels, unit: batch * tiles,
                   "MISC": batch * tiles}, hbm={"kv": kv_bytes, "activations": q_in})
    sv_cols = math.ceil(heads * hd / tile_n) * tile_n
    sv = Op("attn_sv", unit, r.kv_dtype, batch * tiles, stream_bytes=kv_bytes, st_bytes=out,
            macs=batch * q_rows * key_rows * sv_cols * attn_density,
            insts={"LD": batch * tiles * d.channels, unit: batch * tiles,
                   "ST": batch if out else 0}, hbm={"kv": kv_bytes, "activations": out})
    return [qk, sv]


def _norm(r: _Run, name: str, M: int, hidden: int) -> Op:
    """RMSNorm on the vector unit; every core normalises the whole row (it needs all of it)."""
    act = 0.0 if r.on_chip else M * hidden * r.act
    rows = math.ceil(M / r.d.mm_tile_m)
    return Op(name, None, tiles=rows, act_bytes=act, st_bytes=act / r.d.cores,
              vec=TWO_PASS * M * hidden,
              insts={"MISC": rows, "LD": rows if act else 0, "ST": rows if act else 0},
              hbm={"activations": act + act / r.d.cores})


def _layer(r: _Run, s: LLMShape, phase: str, batch: int, L: int, ctx: int,
           attn_density: float) -> list[Op]:
    M, h, kvd = batch * L, s.hidden, s.kv_heads * s.head_dim
    mlp = ([_linear(r, "gate", h, s.ffn, M, vec_passes=1, misc=1),  # fused SiLU
            _linear(r, "up", h, s.ffn, M, vec_passes=1, misc=1)]  # fused gate*up
           if s.gated_mlp else [_linear(r, "up", h, s.ffn, M, vec_passes=1, misc=1)])
    return [_norm(r, "input_norm", M, h),
            _linear(r, "q", h, h, M, vec_passes=ROPE_PASSES, misc=ROPE_PASSES),
            _linear(r, "k", h, kvd, M, vec_passes=ROPE_PASSES, misc=ROPE_PASSES,
                    kv_store=True),
            _linear(r, "v", h, kvd, M, kv_store=True),
            *_attention(r, s, phase, batch, L, ctx, attn_density),
            _linear(r, "o", h, h, M, vec_passes=1, misc=1),  # fused residual add
            _norm(r, "post_norm", M, h), *mlp,
            _linear(r, "down", s.ffn, h, M, vec_passes=1, misc=1)]  # fused residual add


def _density(sparsity: float | dict[str, float]) -> dict[str, float]:
    if isinstance(sparsity, dict):
        bad = sorted(set(sparsity) - set(PROJECTIONS))
        if bad:
            raise ConfigError(f"sparsity keys {bad} are not projections; use {PROJECTIONS}")
        table = dict(sparsity)
    else:
        table = {p: sparsity for p in PROJECTIONS if p != "lm_head"}
    for p, v in table.items():
        if not 0 <= float(v) < 1:
            raise ConfigError(f"sparsity[{p}] = {v} must be in [0, 1)")
    return {p: 1 - float(v) for p, v in table.items()}


def estimate_llm(spec: HardwareSpec, shape: LLMShape, *, phase: str, batch: int = 1,
                 prompt_len: int = 128, context_len: int | None = None,
                 weight_bits: float = 8, act_bits: float = 8, kv_bits: float = 8,
                 sparsity: float | dict[str, float] = 0.0, weight_format: str = "auto",
                 attn_density: float = 1.0, always_on_chip: bool = True) -> FPGAEstimate:
    """Latency of one LLM phase on a FlightLLM-style FPGA design.

    phase "prefill" runs `prompt_len` tokens per sequence; "decode" one token per sequence
    attending to `context_len` cached tokens (default `prompt_len`) plus itself.
    weight_bits may be a mixed-precision average (e.g. 3.5). sparsity is the fraction of zero
    weights run by the sparse DSP chains (N:M or block), one number for every layer projection
    or a dict per projection (q, k, v, o, gate, up, down, lm_head). The zeros always skip compute;
    they cut loads only when weights are stored compressed (values + log2(M)-bit index per kept
    weight + 1 B per MxM block): weight_format "auto" stores each matrix in whichever format is
    smaller, "dense"/"compressed" force one. attn_density is the kept fraction of a block-sparse
    attention mask. always_on_chip keeps activations in the on-chip global buffer when they fit
    (FlightLLM's always-on-chip decode); otherwise every operator loads its input from and
    stores its output to HBM."""
    if phase not in PHASES:
        raise ConfigError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    if weight_format not in FORMATS:
        raise ConfigError(f"weight_format {weight_format!r} is not one of {', '.join(FORMATS)}")
    for nm, v in (("weight_bits", weight_bits), ("act_bits", act_bits), ("kv_bits", kv_bits)):
        if not 0 < v <= 16:
            raise ConfigError(f"{nm} = {v} must be in (0, 16]")
    if batch < 1 or prompt_len < 1 or (context_len is not None and context_len < 0):
        raise ConfigError("batch and prompt_len must be >= 1 and context_len >= 0")
    if not 0 < attn_density <= 1:
        raise ConfigError(f"attn_density = {attn_density} must be in (0, 1]")
    d = Design.from_spec(spec)
    ctx = (prompt_len if context_len is None else context_len) + 1 if phase == "decode" else 0
    L = 1 if phase == "decode" else prompt_len
    heads_core = math.ceil(shape.heads / d.cores)
    act = act_bits / 8
    work = batch * (L * (2 * shape.hidden + 2 * shape.ffn) + heads_core * ctx) * act
    on_chip = always_on_chip and work <= d.act_buffer
    r = _Run(d, weight_bits, act, kv_bits / 8, _density(sparsity), weight_format, on_chip,
             _dtype(weight_bits, act_bits), _dtype(kv_bits, act_bits))

    layer = _layer(r, shape, phase, batch, L, ctx, attn_density)
    head = [_norm(r, "final_norm", batch, shape.hidden),
            _linear(r, "lm_head", shape.hidden, shape.vocab, batch)]  # last position only
    logits = batch * math.ceil(shape.vocab / d.cores) * 2  # fp16 logits to the host, always
    head[-1].st_bytes += logits
    head[-1].insts["ST"] = head[-1].insts.get("ST", 0) + 1
    head[-1].hbm["activations"] = head[-1].hbm.get("activations", 0.0) + logits
    plan = [(op, shape.layers) for op in layer] + [(op, 1) for op in head]

    sync = spec.launch_overhead.value
    seconds, modules = 0.0, dict.fromkeys(MODULES, 0.0)
    inst = {c: {"count": 0.0, "bytes": 0.0, "cycles": 0.0} for c in CLASSES}
    hbm: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for op, rep in plan:
        t = op.seconds(d, sync) * rep
        ld, comp, vec, st = (x * rep for x in op.stages(d))
        seconds += t
        for m, x in zip(MODULES, (ld, comp, vec, st, sync * rep)):
            modules[m] += x
        for c, n in op.insts.items():
            inst[c]["count"] += n * d.cores * rep
        inst["SYS"]["count"] += rep
        inst["LD"]["bytes"] += (op.stream_bytes + op.act_bytes) * d.cores * rep
        inst["ST"]["bytes"] += op.st_bytes * d.cores * rep
        for c, x in (("LD", ld), ("ST", st), (op.unit, comp), ("MISC", vec), ("SYS", sync * rep)):
            if c:
                inst[c]["cycles"] += x * d.clock
        for k, b in op.hbm.items():
            hbm[k] = hbm.get(k, 0.0) + b * d.cores * rep
        row = rows.setdefault(op.name, {"op": op.name, "unit": op.unit or "vector", "count": 0,
                                        "seconds": 0.0, "load_s": 0.0, "compute_s": 0.0,
                                        "vector_s": 0.0, "store_s": 0.0})
        row["count"] += rep
        for k, x in (("seconds", t), ("load_s", ld), ("compute_s", comp), ("vector_s", vec),
                     ("store_s", st)):
            row[k] += x

    weights = sum(op.footprint * d.cores * rep for op, rep in plan)
    kv_cache = batch * (ctx or L) * shape.layers * 2 * shape.kv_heads * shape.head_dim * r.kv
    tokens = batch * (1 if phase == "decode" else prompt_len)
    settings = {"model": shape.name, "batch": batch, "prompt_len": prompt_len,
                "context_len": ctx - 1 if phase == "decode" else None,
                "weight_bits": weight_bits, "act_bits": act_bits, "kv_bits": kv_bits,
                "sparsity": sparsity, "weight_format": weight_format,
                "attn_density": attn_density, "always_on_chip": always_on_chip,
                "matrix_dtype": r.dtype}
    design = {"cores": d.cores, "clock_hz": d.clock, "mm_dsps_per_core": d.mm_dsps,
              "mv_dsps_per_core": d.mv_dsps, "stream_bw_per_core": d.stream_bw,
              "act_bw_per_core": d.act_bw, "act_buffer_per_core": d.act_buffer,
              "activation_working_set": work}
    return FPGAEstimate(
        target=spec.name, phase=phase, settings=settings, seconds=seconds,
        tokens_per_s=tokens / seconds,
        bound=max(("load", "compute", "vector", "store"), key=modules.get),
        modules=modules, instructions=inst, hbm_bytes=hbm, ops=list(rows.values()),
        activations_on_chip=on_chip, fits_memory=weights + kv_cache <= spec.mem_capacity.value,
        design=design)
