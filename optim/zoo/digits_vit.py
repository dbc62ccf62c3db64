"""A small ViT trained here on scikit-learn's digits: real weights for accuracy measurements.

`train()` fits `ViTForImageClassification` (8×8 images, one token per pixel plus CLS: 65 tokens,
4 layers, 64 wide) on the 1437 training digits in a few minutes of CPU; the weights ship in
`optim/zoo/assets/digits_vit.safetensors` (zoo name `digits_vit`) so tests and benchmarks never
retrain. `accuracy(model)` is top-1 on the 360 held-out digits.

    python -m optim.zoo.digits_vit          # retrain and overwrite the shipped weights
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from optim.zoo.data import digits

WEIGHTS = Path(__file__).parent / "assets" / "digits_vit.safetensors"
CONFIG = dict(image_size=8, patch_size=1, num_channels=1, hidden_size=64, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=128, num_labels=10,
              attn_implementation="sdpa")


def build() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**CONFIG))


def load() -> torch.nn.Module:
    """The shipped trained model, in eval mode."""
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"{WEIGHTS} is missing; run `python -m optim.zoo.digits_vit`")
    model = build()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def accuracy(model, batch: int = 360) -> float:
    """Top-1 accuracy (%) on the 360 held-out digits (one batch: optimized graphs are static)."""
    x, y = digits("test")
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
            correct += int((logits.argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def train(epochs: int = 50, lr: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """AdamW, 2 warm-up epochs then cosine decay, batch 64; prints held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = digits("train")
    model = build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = (len(y) + 63) // 64
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=2 * per_epoch),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, (epochs - 2) * per_epoch)],
        milestones=[2 * per_epoch])
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            model.eval()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy "
                  f"{accuracy(model):.1f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
            model.train()
    model.eval()
    WEIGHTS.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    return model


if __name__ == "__main__":
    torch.set_num_threads(2)
    train()
