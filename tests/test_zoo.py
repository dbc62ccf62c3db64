"""Model zoo: every entry loads offline, exports with torch.export, and matches eager."""

from __future__ import annotations

import pytest
import torch

from optim import zoo
from optim.errors import UnknownNameError

ALL = ["bert", "char_lm", "digits_vit", "dit", "gpt2", "llama", "minilm", "vit"]
# Attention form in the exported graph: "sdpa" = aten.scaled_dot_product_attention,
# "softmax" = explicit matmul -> softmax -> matmul.
FORM = {"minilm": "sdpa", "bert": "sdpa", "vit": "sdpa", "dit": "sdpa", "digits_vit": "sdpa",
        "gpt2": "softmax", "llama": "softmax", "char_lm": "softmax"}


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return []


def _attention_ops(ep: torch.export.ExportedProgram) -> dict[str, int]:
    counts = {"sdpa": 0, "softmax": 0}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "scaled_dot_product_attention" in target:
            counts["sdpa"] += 1
        elif "softmax" in target:
            counts["softmax"] += 1
    return counts


def test_names() -> None:
    assert zoo.names() == ALL


def test_unknown_name_lists_names_and_suggests() -> None:
    with pytest.raises(KeyError) as exc:
        zoo.load("lama")
    assert isinstance(exc.value, UnknownNameError)
    msg = str(exc.value)
    assert "Did you mean 'llama'?" in msg and all(n in msg for n in ALL)
    with pytest.raises(KeyError, match="Did you mean 'minilm'"):
        zoo.load("minilml")


@pytest.mark.parametrize("name", ALL)
def test_loads_eval_fp32(name: str, zoo_model) -> None:
    z = zoo_model(name)
    assert z.name == name
    assert z.family in {"encoder", "decoder", "vision", "diffusion"}
    assert not z.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in z.model.parameters())
    assert z.num_attention_layers >= 2 and z.description
    assert (z.tokenizer is not None) == (name == "minilm")


@pytest.mark.parametrize("name", ALL)
def test_export_matches_eager(name: str, zoo_model) -> None:
    z = zoo_model(name)
    with torch.no_grad():
        ref = _tensors(z.model(*z.example_args, **z.example_kwargs))
        ep = torch.export.export(z.model, z.example_args, z.example_kwargs, strict=False)
        got = _tensors(ep.module()(*z.example_args, **z.example_kwargs))
    assert ref and len(got) == len(ref)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    ops = _attention_ops(ep)
    assert ops[FORM[name]] == z.num_attention_layers, ops
    assert sum(ops.values()) == z.num_attention_layers, ops


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "minilm"])
def test_text_inputs_follow_batch_and_seq(name: str) -> None:
    z = zoo.load(name, batch=3, seq=24)
    ids = z.example_kwargs.get("input_ids", z.example_args[0] if z.example_args else None)
    assert ids.shape == (3, 24) and ids.dtype == torch.int64


def test_image_inputs_follow_config() -> None:
    vit = zoo.load("vit", batch=3, image_size=16, patch_size=4, num_hidden_layers=3)
    assert vit.example_args[0].shape == (3, 3, 16, 16) and vit.num_attention_layers == 3
    with torch.no_grad():
        assert vit.model(*vit.example_args).logits.shape == (3, 10)
    dit = zoo.load("dit", batch=1, sample_size=16, num_layers=3)
    assert dit.example_args[0].shape == (1, 4, 16, 16) and dit.num_attention_layers == 3
    with torch.no_grad():
        assert dit.model(*dit.example_args, **dit.example_kwargs)[0].shape == (1, 8, 16, 16)


def test_seed_is_deterministic() -> None:
    a, b, c = zoo.load("bert", seed=1), zoo.load("bert", seed=1), zoo.load("bert", seed=2)
    pa, pb, pc = (next(z.model.parameters()) for z in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(a.example_kwargs["input_ids"], b.example_kwargs["input_ids"])


def _embed(z: zoo.ZooModel, texts: list[str]) -> torch.Tensor:
    enc = z.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = z.model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_is_real_pretrained(zoo_model) -> None:
    z = zoo_model("minilm")
    assert sum(p.numel() for p in z.model.parameters()) == 22_713_216
    assert z.model.config._attn_implementation == "sdpa"
    ids, mask = z.example_kwargs["input_ids"], z.example_kwargs["attention_mask"]
    assert ids.shape == mask.shape == (2, 16)
    assert (ids[:, 0] == z.tokenizer.cls_token_id).all()  # real tokenized text, not random ids
    e = _embed(z, ["A man is playing a guitar.", "Someone plays the guitar.",
                   "The stock market fell sharply today."])
    same, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert same > 0.6 and same > unrelated + 0.3


def test_char_lm_is_really_trained():
    from optim.zoo import char_lm

    ppl = char_lm.perplexity(char_lm.load())
    assert ppl < 6.0  # per byte on held-out text; an untrained model is near 256
