"""optim's passes. Importing this package registers each one in `optim.registry.PASSES`."""

from passes import (cleanup, dynamic_width, fuse_attention, linearize_attention,  # noqa: F401
                    low_rank, merge_tokens, prune_weights, quantize, quantize_int4,
                    sparsify)
