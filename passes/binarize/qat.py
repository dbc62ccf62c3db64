"""End-to-end distillation of a binarized graph: short quantization-aware training with the float
model as teacher (the distillation BiT and BinaryBERT use, on calibration batches only).

`binarize` first fits each binary linear alone, to the float layer's output; errors still compound
through the blocks. Here every `optim::linear_binary` op of the graph is trained at once so that
the graph's outputs match the float model's. The packed kernels have no gradients, so training
runs on a copy of the graph in which each op is its float simulation (`binary.simulate`, with
straight-through signs) reading trainable latent weights, scales α, thresholds τ and the
unfolded bias. The loss is the graph outputs' relative error (matching the binary layers'
inputs as well, as BinaryBERT and BiT distil hidden states, did not do better in a one-off A/B
on MiniLM at 100 steps: 0.37 vs 0.39 embedding cosine). Afterwards the latent signs are packed
again and τ is folded into the bias again.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from optim.ir import add_constant, get_constant, replace_constant
from passes.binarize import binary
from passes.common.graph_runner import output_error, output_loss, run, swap_constant


def simulate_ste(x: torch.Tensor, latent: torch.Tensor, alpha: torch.Tensor,
                 bias: torch.Tensor | None, tau: torch.Tensor | None) -> torch.Tensor:
    """A binary linear as float ops, differentiable in its latent weights (straight-through)."""
    return binary.simulate(x, binary.ste_sign(latent), alpha, bias, tau)


def distill(gm: torch.fx.GraphModule, magnitudes: dict[str, torch.Tensor], batches: list,
            held_out: list, teacher: dict[int, list], steps: int, lr: float,
            seed: int = 0) -> dict:
    """Train every binary linear of `gm` (in place) so its outputs match `teacher` (the float
    model's outputs per batch, keyed by `id(batch)`).

    `magnitudes` maps a linear_binary node's name to |W| of the float weights it came from: the
    latent weights start as sign × |W|, so small weights flip first. The result is kept only if
    the relative output error on `held_out` falls; returns that error before and after."""
    ops = [n for n in gm.graph.nodes
           if n.target is torch.ops.optim.linear_binary.default and n.name in magnitudes]
    if not ops:
        return {"kept": False, "steps": 0, "linears_trained": 0}
    before = output_error(gm, held_out, [teacher[id(b)] for b in held_out])
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        train = copy.deepcopy(gm)
        names = {o.name for o in ops}
        copies = [n for n in train.graph.nodes if n.name in names]  # collected, then replaced
        layers = {n.name: _trainable(train, n, magnitudes[n.name]) for n in copies}
        groups = []
        for p in layers.values():
            scale = float(p["latent"].detach().abs().mean())
            rest = [p[k] for k in ("alpha", "tau") if p[k] is not None]
            groups += [{"params": [p["latent"]], "lr": lr * scale * 10},
                       {"params": rest, "lr": lr * scale}]
            groups += [{"params": [p["bias"]], "lr": lr * scale}] if p["bias"] is not None else []
        opt = torch.optim.Adam(groups)
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = output_loss(run(train, batch), teacher[id(batch)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p in layers.values():
                    p["alpha"].clamp_(min=1e-8)
    with torch.no_grad():
        after = output_error(train, held_out, [teacher[id(b)] for b in held_out])
        kept = after < before
        if kept:
            for n in ops:
                _write_back(gm, n, {k: None if v is None else v.detach()
                                    for k, v in layers[n.name].items()})
    return {"relative_error_before": before, "relative_error_after": after, "kept": kept,
            "steps": steps, "linears_trained": len(ops)}


def _parts(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple:
    x, bits, alpha, bias, tau, k = n.args
    return (x, binary.unpack_bits(get_constant(gm, bits).T, k), get_constant(gm, alpha),
            get_constant(gm, bias), get_constant(gm, tau), k)


def _unfolded_bias(sign_w, alpha, bias, tau):
    """The kernel's bias has α·sign(W)·τ folded in; training moves signs, α and τ."""
    if tau is None or bias is None:
        return bias
    return bias - tau @ (sign_w * binary.expand_groups(alpha, sign_w.shape[1])).T


def _trainable(train: torch.fx.GraphModule, n: torch.fx.Node, magnitude: torch.Tensor) -> dict:
    """Replace the op `n` of the training copy by `simulate_ste` on new trainable constants."""
    x, sign_w, alpha, bias, tau, _ = _parts(train, n)
    params = {"latent": sign_w * magnitude.float().abs().clamp_min(1e-8),
              "alpha": alpha.float(), "bias": _unfolded_bias(sign_w, alpha, bias, tau),
              "tau": tau}
    params = {k: None if v is None else v.detach().float().clone().requires_grad_(True)
              for k, v in params.items()}
    with train.graph.inserting_before(n):
        nodes = [None if v is None else add_constant(train, f"{n.name}_{k}", v.detach(), n)
                 for k, v in params.items()]
        new = train.graph.call_function(simulate_ste, (x, *nodes))
    for node, v in zip(nodes, params.values()):
        if node is not None:
            swap_constant(train, node.target, v)  # the graph reads the trainable tensor itself
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    train.graph.erase_node(n)
    return params


def _write_back(gm: torch.fx.GraphModule, n: torch.fx.Node, p: dict) -> None:
    """Pack the trained signs and fold τ into the bias again, in `gm`'s constants of op `n`."""
    _, bits, alpha, bias, tau, k = n.args
    sign_w = binary.signs(p["latent"])
    replace_constant(gm, bits, binary.pack_bits(sign_w).T.contiguous())
    replace_constant(gm, alpha, p["alpha"].float())
    if tau is not None:
        replace_constant(gm, tau, p["tau"].float())
    if bias is not None:
        folded = p["bias"] if p["tau"] is None else \
            p["bias"] + p["tau"] @ (sign_w * binary.expand_groups(p["alpha"], k)).T
        replace_constant(gm, bias, folded.float())
