"""Families outside the zoo, built from small `transformers` configs: each goes through the
default cpu pipeline (issue 24). A family here once crashed a pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AlbertConfig, AlbertModel, ElectraConfig, ElectraModel

import optim

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             vocab_size=100)
FAMILIES = {
    # an embedding projection (16 -> 32) feeds q, k and v directly: a quantized linear reading
    # another's output
    "albert": lambda: AlbertModel(AlbertConfig(embedding_size=16, **SMALL)),
    "electra": lambda: ElectraModel(ElectraConfig(embedding_size=16, **SMALL)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_default_pipeline_runs_and_fuses_every_attention(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 100, (2, 16))
    fast = optim.optimize(model, "cpu", (), example_kwargs={
        "input_ids": ids, "attention_mask": torch.ones_like(ids)}, pipeline="cpu_default",
        backend="torch", measure_latency=False)
    counts = {p["name"]: p["counts"] for p in fast.report["passes"]}
    assert counts["fuse_attention"]["attention_fused"] == 2
    assert counts["quantize"]["linear_quantized"] == 13  # q, k, v, o, 2 MLP per layer + proj
    out = fast(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    cos = torch.nn.functional.cosine_similarity(out[0].flatten(), ref[0].flatten(), dim=0)
    assert cos > 0.99
