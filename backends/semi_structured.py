"""2:4-masked linears → PyTorch semi-structured sparse weights (NVIDIA sparse tensor cores).

`prune_weights(pattern="2:4")` marks each linear it masks with `weight_format: "2:4"`. On a CUDA
GPU in fp16 or bf16, `convert` swaps each such weight for `to_sparse_semi_structured` (the kept
half of the values plus 2-bit position metadata), so `aten.linear` runs a sparse GEMM
(cuSPARSELt or CUTLASS). A linear it cannot convert stays dense, and the summary says why.
"""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import get_constant, module_path
from optim.linears import constant_linears, weight_and_bias

aten = torch.ops.aten


def is_2_4(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of every output row."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def convert(gm: torch.fx.GraphModule) -> dict:
    """Swap the 2:4-marked `aten.linear` weights of `gm` (already on the GPU, in fp16/bf16) for
    semi-structured sparse tensors, in place. Returns what was converted and what was not."""
    from torch.sparse import to_sparse_semi_structured

    converted, dense = [], []
    for n in constant_linears(gm):
        if n.meta.get("weight_format") != "2:4":
            continue
        where = module_path(n)
        w_node, _ = weight_and_bias(n)
        w = get_constant(gm, w_node)
        why = None
        if n.target is not aten.linear.default:
            why = f"{n.target} (transposed weight): only aten.linear weights are converted"
        elif len(w_node.users) > 1:
            why = "the weight is shared with other ops"
        elif not is_2_4(w):
            why = "the weight is no longer 2:4 (a later pass changed it)"
        if why is None:
            try:
                sparse = to_sparse_semi_structured(w.detach())
                owner, _, name = w_node.target.rpartition(".")
                # the documented form: a Parameter wrapping the sparse tensor subclass
                setattr(gm.get_submodule(owner) if owner else gm, name,
                        torch.nn.Parameter(sparse, requires_grad=False))
                converted.append(where)
                continue
            except (RuntimeError, ValueError) as e:  # shape or dtype the kernels do not take
                why = str(e).splitlines()[0][:200]
        dense.append({"where": where, "why": why})
    return {"converted": len(converted), "kept_dense": dense}
