"""Model factories for `model: {python: "tests.factories:NAME"}` in pipeline files."""


import torch

from optim import zoo


class TinyMLP(torch.nn.Module):
    """8 -> 16 -> 4 with a ReLU, seeded: the smallest model a save or load test needs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def small_gpt2(layers: int = 1):
    z = zoo.load("gpt2", n_layer=layers)
    return z.model, z.example_args, z.example_kwargs


def not_a_model():
    return "nope"
