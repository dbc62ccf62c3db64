"""CPU schedule rules of our own for TVM (dlight-style: each rule looks at one PrimFunc after
Relax fusion and returns a scheduled copy, or None to let the next rule try).

- `Matmul`: a (batched) matmul block with its fused producers and epilogues (bias, scale,
  mask, GELU, residual add). The output is computed in `MR x NR` register tiles (NR a multiple
  of the AVX2 width, unrolled over MR rows so LLVM keeps the tile in ymm registers and streams
  the reduction with broadcast + FMA); epilogues are applied as the tile is written back, so the
  fused ops cost no extra pass over memory. Dense layers loop over column panels of the weight
  in parallel and pack each panel contiguous once (GotoBLAS-style B packing); batched matmuls
  (attention) parallelize over the batch x heads loops.
- `RowReduction`: softmax and norms, rows in parallel, reductions vectorized with rfactor.
- `Injective`: elementwise, broadcast, transpose and reshape chains, inlined into one loop nest,
  vectorized on the innermost axis and parallel over the rest.

Tile sizes come from a `MatmulConfig`; `candidates()` lists the ones worth measuring for a
shape (the tuner in `tvm_tuning` picks among them), and `default_config()` is the choice made
without measuring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import s_tir, tirx
from tvm.s_tir import ScheduleError
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base.common_schedules import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VECTOR_LANES = 8  # fp32 lanes in an AVX2 register
PARALLEL_MIN_ELEMENTS = 1 << 14  # below this a parallel launch costs more than it saves
SYMBOLIC = -1  # a MatmulShape extent that depends on the call's shape (dynamic batch or length)


class ScheduleRuleMiss(Exception):
    """The function looked like this rule's pattern but is not; the next rule gets it."""


@dataclass(frozen=True)
class MatmulConfig:
    """One schedule for a matmul: rows and columns of the register tile, and whether the
    weight's column panel is packed contiguous before use."""

    mr: int = 4
    nr: int = 16
    pack: bool = True

    def key(self) -> str:
        return f"mr{self.mr}-nr{self.nr}-{'pack' if self.pack else 'nopack'}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MatmulShape:
    """What a schedule depends on: batch (product of the batch loops), M, N, K, the dtypes and
    whether the right operand has batch dimensions of its own (attention) or is a weight."""

    batch: int  # SYMBOLIC where it depends on the call's shape
    m: int  # SYMBOLIC where it depends on the call's shape
    n: int
    k: int
    dtype: str
    batched_rhs: bool

    def key(self) -> str:
        rhs = "bb" if self.batched_rhs else "w"
        b, m, n, k = ("?" if v == SYMBOLIC else v for v in (self.batch, self.m, self.n, self.k))
        return f"b{b}-m{m}-n{n}-k{k}-{self.dtype}-{rhs}"

    @property
    def symbolic(self) -> bool:
        return SYMBOLIC in (self.batch, self.m, self.n, self.k)


def default_config(shape: MatmulShape) -> MatmulConfig:
    """The untuned choice: a 4 x 16 tile (8 ymm accumulators, room for the operands), packing
    B's column panels when many row tiles reuse them or when they need padding (packing pads
    them for free; unpacked, every load would be bounds-checked)."""
    nr = 16 if shape.n == SYMBOLIC or shape.n >= 16 else VECTOR_LANES
    return MatmulConfig(mr=4, nr=nr, pack=shape.symbolic or shape.m >= 64 or shape.n % nr != 0)


def candidates(shape: MatmulShape) -> list[MatmulConfig]:
    """Register tiles that fit AVX2's 16 ymm registers (accumulators + operands), with and
    without packing (only with, where N needs padding: unpacked, every load is checked)."""
    tiles = [(4, 16), (6, 16), (4, 24), (2, 32), (4, 8), (8, 8)]
    return [MatmulConfig(mr, nr, p) for mr, nr in tiles for p in (True, False)
            if (shape.n == SYMBOLIC or nr <= max(shape.n, VECTOR_LANES))
            and (shape.m == SYMBOLIC or mr <= max(shape.m, 1))
            and (p or shape.n % nr == 0)]


@dataclass(frozen=True)
class Dispatch:
    """Tiles chosen per shape bucket for a matmul with a symbolic extent (dynamic batch or
    length): `(most, config)` pairs by increasing work, where work is batch·M·N·K of the call;
    a call runs the first config whose `most` bounds its work (the last has None: the rest).
    The kernel holds every variant and branches once per call."""

    choices: tuple[tuple[int | None, MatmulConfig], ...]


def workload_key(func) -> str:
    """Identity of an unscheduled PrimFunc: equal for the same computation, in any process."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


class Matmul(CPUScheduleRule):
    """Register-tiled (batched) matmul with fused epilogues; see the module docstring.

    `configs` maps a workload key (`workload_key(func)`) to the `MatmulConfig` the tuner chose;
    a workload not in it gets `default_config`."""

    def __init__(self, configs: dict | None = None):
        self.configs = configs or {}

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        found = find_matmul(sch)
        if found is None:
            return None
        main, others, shape = found
        config = self.configs.get(workload_key(func)) or default_config(shape)
        try:
            if isinstance(config, Dispatch):
                return [_Scheduled(schedule_dispatch(func, config))]
            return schedule_matmul(sch, main, others, shape, config)
        except (ScheduleError, ScheduleRuleMiss):  # e.g. a reduction after the matmul
            return None


class _Scheduled:
    """A finished PrimFunc where dlight expects a Schedule (it reads `.mod["main"]`)."""

    def __init__(self, func):
        self.mod = {"main": func}


def matmul_work(func):
    """batch·M·N·K of the matmul in `func`, as a TIR expression of its shape variables."""
    infos = normalize_prim_func(s_tir.Schedule(func))
    main = next(b for b in infos if not b.is_injective())
    work = tirx.IntImm("int64", 1)
    for d in main.dom():  # in int64: an LM head's batch·M·N·K overflows int32
        work = work * (d if isinstance(d, int) else d.astype("int64"))
    return work


def schedule_dispatch(func, dispatch: Dispatch):
    """`func` scheduled once per config of `dispatch`, the variants joined by a branch on the
    call's work (one test per call, none inside the loops)."""
    variants = []
    for most, config in dispatch.choices:
        sch = s_tir.Schedule(func)
        main, others, shape = find_matmul(sch)
        variants.append((most, schedule_matmul(sch, main, others, shape, config).mod["main"]))
    work = matmul_work(func)
    body = variants[-1][1].body
    for most, variant in reversed(variants[:-1]):
        body = tirx.IfThenElse(work <= most, variant.body, body)
    return variants[0][1].with_body(body)


def find_matmul(sch: s_tir.Schedule):
    """The one multiply-accumulate block of the function (dom kind S..SSR, two reads), the
    other (injective) blocks and the matmul's shape; None if the function has no such block or
    another reduction besides it."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1:
        return None
    main = reductions[0]
    kinds = main.dom_kind()
    if len(kinds) < 3 or not kinds.endswith("SSR") or kinds.count("R") != 1:
        return None
    block = sch.get(main.block_rv)
    if len(block.reads) != 2 or not isinstance(block.body, tirx.BufferStore):
        return None
    if not isinstance(block.body.value, tirx.Add):  # c = c + a * b (possibly with casts)
        return None
    dom = [_static(d) for d in main.dom()]
    lhs, rhs = (r.source for r in block.reads)
    batch = 1
    for d in dom[:-3]:
        batch = batch * d if isinstance(batch, int) and isinstance(d, int) else SYMBOLIC
    shape = MatmulShape(batch=batch, m=dom[-3], n=dom[-2], k=dom[-1],
                        dtype=f"{lhs.dtype}x{rhs.dtype}->{block.writes[0].source.dtype}",
                        batched_rhs=len(rhs.shape) > 2)
    return main.block_rv, [b for b in infos if b is not main], shape


def _static(d):
    """An extent as an int, or SYMBOLIC when it depends on a shape variable."""
    return int(d) if isinstance(d, (int, tirx.IntImm)) else SYMBOLIC


def schedule_matmul(sch: s_tir.Schedule, main, others: list, shape: MatmulShape,
                    config: MatmulConfig) -> s_tir.Schedule:
    """Tile `main` per `config`, write its tile back through the fused epilogues.

    A shape the tile does not divide (a 50257-token LM head) is padded (`pad_einsum`): the
    padding is folded into the weight-panel packing and the guarded write-back, so the inner
    loop never tests bounds."""
    mr, nr = config.mr, config.nr
    # a symbolic extent is padded to whole tiles too (it may not divide)
    pad = [mr if shape.m == SYMBOLIC or shape.m % mr else 1,
           nr if shape.n == SYMBOLIC or shape.n % nr else 1]
    if pad != [1, 1]:
        n_batch = len(sch.get_loops(main)) - 3
        sch.pad_einsum(main, [1] * n_batch + pad + [1])
    write_back = sch.cache_write(main, 0, "local")
    panel = sch.cache_read(main, 1, "global") if config.pack else None
    # every other block is a producer (mask, cast, padding) or an epilogue (bias, GELU,
    # residual, un-padding): inline producers into their consumers, and the epilogue chain into
    # the tile write-back
    # the block that copies the padded result out: epilogues fold into it, and it stays a block
    # of its own (folding it into the write-back would drop its bounds check)
    unpad = sch.get_consumers(write_back)[0] if pad != [1, 1] else None
    # a symbolic M padded to whole row tiles: the padded copy of A is its own pass, so that
    # the inner loop loads rows without a bounds test
    lhs_pad = _producer_of(sch, main, 0) if shape.m == SYMBOLIC and pad[0] != 1 else None
    keep = [sch.get(b) for b in (main, write_back, panel, unpad, lhs_pad) if b is not None]
    rest = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
            if not any(sch.get(b).same_as(k) for k in keep)]
    if not _inline_all(sch, rest):
        raise ScheduleRuleMiss("a block around the matmul cannot be fused into it")
    if lhs_pad is not None:
        rows, *cols = sch.get_loops(lhs_pad)
        sch.parallel(rows)
        if cols and _static(sch.get(cols[-1]).extent) % VECTOR_LANES == 0:
            sch.vectorize(sch.split(cols[-1], [None, VECTOR_LANES])[1])
    loops = sch.get_loops(main)
    batch, (i, j, k) = loops[:-3], loops[-3:]
    io, ii = sch.split(i, [None, mr])
    jo, ji = sch.split(j, [None, nr])
    outer = (sch.fuse(*batch) if len(batch) > 1 else batch[0]) if batch else None
    sch.reorder(*([outer] if outer else []), jo, io, k, ii, ji)
    if shape.symbolic or shape.batch * shape.m * shape.n >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer if outer else jo)
    if panel is not None:  # one column panel of B, packed contiguous, serves every row tile
        sch.compute_at(panel, jo)
        sch.vectorize(sch.get_loops(panel)[-1])
    tile = io
    sch.reverse_compute_at(write_back, tile)
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.decompose_reduction(main, k)
    sch.vectorize(sch.get_loops(write_back)[-1])
    if unpad is not None:  # the tile's in-bounds part, right after the tile is written
        sch.reverse_compute_at(unpad, tile)
    return sch


def _producer_of(sch: s_tir.Schedule, block, index: int):
    """The block that writes `block`'s read `index` (None if it is a function input)."""
    buf = sch.get(block).reads[index].source
    for b in sch.get_producers(block):
        if any(w.source.same_as(buf) for w in sch.get(b).writes):
            return b
    return None


def _inline_all(sch: s_tir.Schedule, blocks: list) -> bool:
    """Inline every block into its consumer (or, failing that, its producer); False when one
    cannot be inlined either way."""
    blocks = list(blocks)
    while blocks:
        for n, b in enumerate(blocks):
            try:
                sch.compute_inline(b)
            except ScheduleError:
                try:
                    sch.reverse_compute_inline(b)
                except ScheduleError:
                    continue
            del blocks[n]
            break
        else:
            return False
    return True


class Injective(CPUScheduleRule):
    """Elementwise / broadcast / layout chains: one loop nest, vectorized and parallel."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        for block in try_inline(sch, list(infos)):  # several remain for multi-output ops (split)
            if not _flat_parallel_vectorized(sch, block.block_rv, len_threads(target)):
                return None
        return sch


def _flat_parallel_vectorized(sch: s_tir.Schedule, block, threads: int) -> bool:
    """One block's loop nest fused into one loop, split into vectors and thread chunks. With a
    symbolic extent (dynamic shapes) only the static inner loops are fused and vectorized, and
    the outer loops, up to the last symbolic one, run in parallel: fusing a symbolic extent
    would cost integer divisions by it on every element (the loops fused for threads have a
    symbolic extent at most in their first one)."""
    loops = sch.get_loops(block)
    if not loops:
        return False
    extents = [_static(sch.get(lp).extent) for lp in loops]
    if SYMBOLIC in extents:
        last = max(i for i, e in enumerate(extents) if e == SYMBOLIC)
        outer, inner = loops[: max(last, 1)], loops[last + 1:]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        static_inner = 1
        for e in extents[last + 1:]:
            static_inner *= e
        if inner and static_inner % VECTOR_LANES == 0:
            fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            _, vec = sch.split(fused, [None, VECTOR_LANES])
            sch.vectorize(vec)
        return True
    total = 1
    for e in extents:
        total *= e
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if total % VECTOR_LANES == 0:
        fused, vec = sch.split(fused, [None, VECTOR_LANES])
        sch.vectorize(vec)
    if total >= PARALLEL_MIN_ELEMENTS:
        outer, _ = sch.split(fused, [threads, None])
        sch.parallel(outer)
    return True


class RowReduction(CPUScheduleRule):
    """Softmax, layer norm, RMS norm: blocks that reduce the last axis of each row, between
    elementwise blocks. Rows run in parallel with every block of a row computed together
    (the row stays in L1); each reduction keeps VECTOR_LANES partial results in one register
    (rfactor) and folds them at the end, so the reduction runs at vector width instead of one
    dependent scalar add or max per element; elementwise blocks are vectorized."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or not infos[-1].is_injective():
            return None
        reductions = [b for b in infos if not b.is_injective()]
        lead = len(infos[-1].dom_kind())
        if not reductions or lead < 2:
            return None
        symbolic = False  # a row length that depends on the call: rows in parallel, no rfactor
        for b in reductions:  # S..SR over the same rows as the output, last axis reduced
            kinds, length = b.dom_kind(), _static(b.dom()[-1])
            symbolic = symbolic or length == SYMBOLIC
            if kinds != "S" * (lead - 1) + "R" or (length != SYMBOLIC and
                                                   length % VECTOR_LANES):
                return None
        try:
            for b in infos[:-1]:  # cheap elementwise steps (x - max) fold into their consumer
                if b.is_injective() and len(sch.get_consumers(b.block_rv)) == 1:
                    try:
                        sch.compute_inline(b.block_rv)
                    except ScheduleError:
                        pass
            partials = []
            for b in [] if symbolic else reductions:
                r = sch.get_loops(b.block_rv)[-1]
                _, lanes = sch.split(r, [None, VECTOR_LANES])
                partials.append(sch.rfactor(lanes, factor_axis=lead - 1))
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            rows = sch.get_loops(blocks[-1])[: lead - 1]
            row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            sch.parallel(row)
            for block in reversed(blocks[:-1]):
                sch.compute_at(block, row, preserve_unit_loops=True)
            for block in blocks:
                if any(sch.get(block).same_as(sch.get(p)) for p in partials):
                    # under the row loop: the lane loop, unit row loops, the step loop; put the
                    # lanes innermost so that each step is one vector op
                    *inner, step = sch.get_loops(block)[1:]
                    lane = next(lp for lp in inner if int(sch.get(lp).extent) == VECTOR_LANES)
                    sch.reorder(step, lane)
                    sch.vectorize(lane)
                    sch.decompose_reduction(block, step)
                elif all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                    _vectorize_inner(sch, block)
        except ScheduleError:
            return None
        return sch


def _vectorize_inner(sch: s_tir.Schedule, block) -> None:
    """Vectorize the innermost loop of an elementwise block, split to the vector width."""
    inner = sch.get_loops(block)[-1]
    extent = _static(sch.get(inner).extent)
    if extent != SYMBOLIC and extent % VECTOR_LANES == 0:
        if extent > VECTOR_LANES:
            _, inner = sch.split(inner, [None, VECTOR_LANES])
        sch.vectorize(inner)


def len_threads(target) -> int:
    cores = target.attrs.get("num-cores")
    return max(int(cores), 1) if cores is not None else 1


def unscheduled(mod) -> list[str]:
    """Kernels of `mod` that no rule scheduled (they run as TVM's naive loop nest): listed in
    the report, since one of them can cost more than all the scheduled ones together."""
    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and not (f.attrs and
                                                          f.attrs.get("tirx.is_scheduled")))


def default_rules(configs: dict | None = None) -> list:
    """dlight's GEMV for one-row matmuls, then ours; dlight's reduction rule takes the norms
    ours decline (a reduction length that is not a multiple of the vector width)."""
    from tvm.s_tir import dlight as dl

    return [dl.cpu.GEMV(), Matmul(configs), RowReduction(), dl.cpu.Reduction(), Injective()]
