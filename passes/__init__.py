"""optim's passes. Importing this package registers each one in `optim.registry.PASSES`."""

from passes import cleanup, fuse_attention, merge_tokens, quantize  # noqa: F401
