"""A small byte-level GPT-2 trained here on real English text: a decoder with real weights.

`train()` fits `GPT2LMHeadModel` (bytes as tokens, 4 layers, 128 wide, 128 positions) on the
Python reference manual's prose (`pydoc_data.topics`, the same text `optim.zoo.data.sentences`
uses) in a few minutes of CPU; the weights ship in `optim/zoo/assets/char_lm.safetensors` (fp16;
zoo name `char_lm`). `perplexity(model)` is per-byte perplexity on held-out text (every 10th
topic), so compression passes on a decoder can be judged on real text.

    python -m optim.zoo.char_lm          # retrain and overwrite the shipped weights
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "assets" / "char_lm.safetensors"
CONFIG = dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512,
              bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="eager")
SEQ = 128


def build() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**CONFIG))


def load() -> torch.nn.Module:
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"{WEIGHTS} is missing; run `python -m optim.zoo.char_lm`")
    model = build()
    model.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS)).items()},
                          strict=False)  # the tied LM head comes from the embedding
    return model.eval()


def text(split: str) -> torch.Tensor:
    """The bytes of the reference manual's topics: every 10th topic held out for `test`."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 10 == 0) == (split == "test")]
    data = "\n\n".join(topics[k] for k in chosen).encode("ascii", "replace")
    return torch.tensor(list(data), dtype=torch.long)


def batches(split: str, batch: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of `batch` × SEQ byte windows (fixed by `seed`)."""
    data = text(split)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ, (n, batch), generator=g)
    return [torch.stack([data[s:s + SEQ] for s in row]) for row in starts]


def perplexity(model, data: list[torch.Tensor] | None = None) -> float:
    """Per-byte perplexity on held-out windows (16 batches of 16 × 128 by default)."""
    data = data if data is not None else batches("test", 16, 16, seed=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in data:
            out = model(input_ids=ids)
            logits = out[0] if isinstance(out, (tuple, list)) else out.logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def train(steps: int = 1200, lr: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    """AdamW, batch 32 × 128 bytes, warm-up then cosine decay; prints held-out perplexity."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = build().train()
    data = text("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (32,))
        ids = torch.stack([data[s:s + SEQ] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 199 or step == steps - 1:
            model.eval()
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out perplexity "
                  f"{perplexity(model):.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            model.train()
    model.eval()
    WEIGHTS.parent.mkdir(exist_ok=True)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(WEIGHTS))
    return model


if __name__ == "__main__":
    torch.set_num_threads(2)
    train()
