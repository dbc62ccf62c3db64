"""Helpers several passes share: `graph_runner` (run a graph on calibration batches, output
error, held-out split), `linears` (constant linear layers and their inputs), `units` (attention
heads and MLP neurons, scored on data), `token_axis` (rewriting shapes along the token axis),
`nested_width` (every width a prefix), `width_distill` (training linears to match outputs)."""
