"""optim's passes. Importing this package registers each one in `optim.registry.PASSES`."""

from passes import (  # noqa: F401
    binarize,
    cleanup,
    distill_outputs,
    distill_widths,
    dynamic_width,
    fuse_attention,
    linearize_attention,
    low_rank,
    merge_tokens,
    prune_weights,
    quantize,
    quantize_int4,
    sparsify,
)
