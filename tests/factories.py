"""Model factories for `model: {python: "tests.factories:NAME"}` in pipeline files."""


from optim import zoo


def small_gpt2(layers: int = 1):
    z = zoo.load("gpt2", n_layer=layers)
    return z.model, z.example_args, z.example_kwargs


def not_a_model():
    return "nope"
