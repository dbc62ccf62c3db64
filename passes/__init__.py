"""optim's passes: graph → graph rewrites of a captured FX graph, one pass per module (or per
folder where a pass has math of its own: `linearize_attention/`, `binarize/`). Importing this
package registers each one in `optim.registry.PASSES`.

Owns: the rewrites and their math; `passes.common` holds what several passes share (the graph
runner, linear-layer discovery, heads and neurons, token-axis and nested-width rewriting,
output distillation). May import: `optim`'s bottom layer (ir, ops, pass_base, ...) and
`hardware` (cost-model gates); never `backends`, `optim.zoo` or the driver.
Invariants every pass keeps are in `passes/README.md`.
"""

from passes import (  # noqa: F401
    binarize,
    cleanup,
    distill_outputs,
    distill_widths,
    dynamic_width,
    fuse_attention,
    fuse_linears,
    linearize_attention,
    low_rank,
    merge_tokens,
    prune_weights,
    quantize,
    quantize_int4,
    remove_padding,
    sparsify,
)
