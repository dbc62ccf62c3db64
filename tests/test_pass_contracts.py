"""The pass contract's tables (what runs before a pass, which models it refuses, the options
the contract runs with) and the refusals. The contract itself (the pass changes something and
stays within its declared numerics, at the traced shape and three others) is
`tests/test_dynamic_shapes.py::test_pass_keeps_the_graph_dynamic`."""

import pytest

from optim.errors import PassError
from optim.testing import capture_example, run_pass

# passes that only do something after a lossy one: what runs on the graph before them
BEFORE = {"distill_outputs": "prune_weights"}
# passes that must refuse a model kind, and the words their refusal gives
REFUSES = {("merge_tokens", m): "causal mask" for m in ("gpt2", "llama")} | \
    {("merge_tokens", "bert"): "padding mask"} | \
    {("remove_padding", m): "nothing is padding" for m in ("gpt2", "llama", "vit", "dit")}
# options the contract runs with: the zoo's tiny models are below linear attention's and token
# merging's break-even, so their cost-model gates are off here (their own tests test them)
OPTIONS = {"linearize_attention": {"gate": False, "fit_steps": 40},
           "merge_tokens": {"gate": False}, "binarize": {"distill_steps": 10},
           "distill_outputs": {"steps": 20, "lr": 1e-3}}


@pytest.mark.parametrize("pass_name, model_name", sorted(REFUSES))
def test_refusals_name_the_reason(pass_name, model_name, zoo_model):
    """The contract where a pass cannot apply; where it can, tests/test_dynamic_shapes.py runs
    every pass on every small zoo model at the traced shape and three others."""
    z = zoo_model(model_name)
    gm = capture_example(z.model, z.example_args, z.example_kwargs)
    with pytest.raises(PassError, match=REFUSES[pass_name, model_name]):
        run_pass(pass_name, gm, z.example_args, z.example_kwargs,
                 options=OPTIONS.get(pass_name))
