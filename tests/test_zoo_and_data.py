import pytest
import torch

from optim import zoo
from optim.errors import UnknownNameError
from optim.numerics import mean_pool
from optim.zoo import data


def test_zoo_names_and_did_you_mean():
    assert set(zoo.names()) == {"minilm", "bert", "gpt2", "llama", "vit", "dit", "digits_vit",
                                "char_lm"}
    with pytest.raises(UnknownNameError, match="Did you mean 'llama'"):
        zoo.load("lama")


def test_minilm_is_real(zoo_model):
    z = zoo_model("minilm")
    assert sum(p.numel() for p in z.model.parameters()) == 22_713_216
    enc = z.tokenizer(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                       "Interest rates rose sharply in March."], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = mean_pool(z.model(**enc).last_hidden_state, enc["attention_mask"])
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_sentences_are_real_distinct_deterministic():
    s = data.sentences(512)
    assert len(set(s)) == 512 and s == data.sentences(512)
    assert all(x[0].isupper() and x.endswith(".") and len(x.split()) >= 6 for x in s)
    assert data.sentences(8, seed=1) != data.sentences(8, seed=0)


def test_digits_split():
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert len(y) + len(yt) == 1797 and set(yt.tolist()) == set(range(10))


@pytest.mark.parametrize("name,options", [("bert", {"hiden_size": 32}),
                                          ("dit", {"num_layer": 1})])
def test_a_misspelled_zoo_option_is_an_error_not_ignored(name, options):
    from optim.errors import ConfigError

    with pytest.raises(ConfigError, match=f"zoo model '{name}'.*{next(iter(options))}"):
        zoo.load(name, **options)
