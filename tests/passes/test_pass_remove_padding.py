"""remove_padding, one pass on small graphs: what it packs and trims, exactness at real tokens on
uneven lengths, and the graphs it refuses."""

from __future__ import annotations

import pytest
import torch

from optim import numerics
from optim.errors import PassError
from optim.testing import capture_example, capture_zoo, run_pass


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")


def _uneven(z, lengths: list[int]) -> dict:
    ids = z.example_kwargs["input_ids"]
    mask = torch.zeros(len(lengths), ids.shape[1], dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids[:len(lengths)], "attention_mask": mask}


def test_token_wise_ops_are_packed_and_attention_trimmed(bert):
    gm, z = bert
    run = run_pass("remove_padding", gm, z.example_args, z.example_kwargs)
    assert run.result.counts["attention_trimmed"] == z.num_attention_layers
    assert run.result.counts["ops_packed"] >= 8 * z.num_attention_layers
    added = run.ops_added()
    assert added["aten.nonzero"] == 1  # the packed positions: once per call
    assert added["optim.attention_trimmed"] == 2 and "optim.attention" not in added
    real = int(z.example_kwargs["attention_mask"].sum())
    assert run.result.details["example_tokens"]["real"] == real


def test_real_tokens_match_on_uneven_lengths(bert):
    gm, z = bert
    run = run_pass("remove_padding", gm, z.example_args, z.example_kwargs)
    seq = z.example_kwargs["input_ids"].shape[1]
    for lengths in ([seq, 1], [1, 3], [seq, seq]):
        kwargs = _uneven(z, lengths)
        fid = numerics.compare(gm(**kwargs), run.gm(**kwargs), kwargs["attention_mask"])
        assert fid["max_abs_error"] <= 1e-5, (lengths, fid)


def test_without_trimming_attention_stays_whole(bert):
    gm, z = bert
    run = run_pass("remove_padding", gm, z.example_args, z.example_kwargs,
                   options={"trim_attention": False})
    assert "attention_trimmed" not in run.result.counts
    assert "optim.attention_trimmed" not in run.ops_added()


class _ReadsPadding(torch.nn.Module):
    """A masked attention layer followed by a mean over every position, padding included:
    packing changes what that mean sees, so the pass must refuse."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        x = self.proj(self.emb(input_ids))
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        keep = attention_mask.bool()[:, None, None, :]
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep)
        x = x + a.transpose(1, 2).reshape(x.shape)
        return self.proj(x + x.mean(dim=1, keepdim=True))


def test_refuses_a_model_that_reads_padded_positions():
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 50, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    gm = capture_example(_ReadsPadding().eval(), (), {"input_ids": ids, "attention_mask": mask})
    with pytest.raises(PassError, match="a value computed at padded positions is read by real"):
        run_pass("remove_padding", gm, (), {"input_ids": ids, "attention_mask": mask})
