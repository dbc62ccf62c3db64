"""Generation with optimized decoders: greedy tokens equal to Hugging Face `generate` token for
token, batches of unequal prompts, seeded sampling, stop tokens, streaming, the cache limit,
and save/load in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import optim
from optim.decoder_checks import hf_generate
from optim.errors import ConfigError

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512,
             max_position_embeddings=128)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512,
                                       n_positions=128, bos_token_id=1, eos_token_id=1))
    elif family == "llama":  # grouped-query attention: 4 query heads share 2 kv heads
        m = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, intermediate_size=128,
                                         eos_token_id=1, pad_token_id=0))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=1, intermediate_size=128,
                                         eos_token_id=1))
    elif family == "mistral":  # a sliding window wider than the cache
        m = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2,
                                             intermediate_size=128, eos_token_id=1,
                                             sliding_window=4096))
    else:
        m = OPTForCausalLM(OPTConfig(**SMALL, ffn_dim=128, word_embed_proj_dim=64,
                                     eos_token_id=1, pad_token_id=0))
    return m.eval()


def _prompt(batch: int = 2, tokens: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, tokens), generator=g)


_BUILT: dict = {}


def _optimized(family: str, backend: str = "torch"):
    key = (family, backend)
    if key not in _BUILT:
        model = _model(family)
        _BUILT[key] = model, optim.optimize(model, "cpu", _prompt(), pipeline="cleanup",
                                            backend=backend, measure_latency=False)
    return _BUILT[key]


@pytest.mark.parametrize("family,backend", [("gpt2", "torch"), ("llama", "torch"),
                                            ("qwen2", "torch"), ("opt", "torch"),
                                            ("mistral", "onnxruntime"),
                                            ("llama", "onnxruntime")])
def test_greedy_tokens_equal_transformers_generate(family, backend):
    model, fast = _optimized(family, backend)
    assert fast.report["fidelity"]["greedy"]["identical"]
    ids = _prompt(3, 11, seed=5)  # another batch and length than traced
    ref = hf_generate(model, ids, torch.ones_like(ids), 24, fast.special_tokens)
    assert torch.equal(fast.generate(ids, 24), ref)


@pytest.mark.parametrize("tokens", [1, 3])
def test_a_short_example_prompt_still_gives_a_step_of_any_length(tokens):
    """An example prompt under 4 tokens traced a one-slot cache that export fixed at 1 (found
    by fuzzing saved decoders): every later step failed a guard."""
    model = _model("gpt2")
    fast = optim.optimize(model, "cpu", _prompt(1, tokens), pipeline="cleanup",
                          backend="torch", measure_latency=False)
    ids = _prompt(2, 9, seed=3)
    ref = hf_generate(model, ids, torch.ones_like(ids), 6, fast.special_tokens)
    assert torch.equal(fast.generate(ids, 6), ref)


def test_batched_prompts_of_unequal_length_match_one_by_one_and_transformers():
    model, fast = _optimized("llama")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [40]]
    out = fast.generate(prompts, 12)
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = torch.tensor(p), 1
    assert torch.equal(out, hf_generate(model, ids, mask, 12, fast.special_tokens))
    for i, p in enumerate(prompts):  # the same tokens as each prompt alone
        alone = fast.generate([p], 12)[0, len(p):]
        assert torch.equal(out[i, 7:], alone)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_long_prompts_prefilled_in_chunks_give_transformers_tokens(backend, monkeypatch):
    """Chunked prefill (each chunk a step over the cache the chunks before it filled), with
    chunks cutting through left-padded prompts of unequal length."""
    from optim import generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    model, fast = _optimized("llama", backend)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42], [7] * 9]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 11 - len(p):], mask[i, 11 - len(p):] = torch.tensor(p), 1
    ref = hf_generate(model, ids, mask, 10, fast.special_tokens)
    blocks = []
    run = fast._run
    monkeypatch.setattr(fast, "_run", lambda ids, *a: blocks.append(ids.shape[1]) or run(ids, *a))
    assert torch.equal(fast.generate(prompts, 10), ref)
    assert blocks[:3] == [4, 4, 3]  # the prompt went in three chunks


def test_sampling_is_reproducible_under_a_seed_and_top_k_1_is_greedy():
    _, fast = _optimized("gpt2")
    ids = _prompt()
    a = fast.generate(ids, 20, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    b = fast.generate(ids, 20, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    c = fast.generate(ids, 20, do_sample=True, temperature=1.5, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(fast.generate(ids, 20, do_sample=True, top_k=1, seed=0),
                       fast.generate(ids, 20))


def test_stop_tokens_end_a_sequence_and_pad_it_while_others_go_on():
    _, fast = _optimized("llama")
    ids = _prompt()
    free = fast.generate(ids, 10, stop_tokens=[])
    stop = int(free[0, ids.shape[1] + 2])  # the first sequence's third new token
    out = fast.generate(ids, 10, stop_tokens=[stop], pad_token_id=0)
    first = out[0, ids.shape[1]:]
    where = int((first == stop).nonzero()[0])
    assert where <= 2 and (first[where + 1:] == 0).all()
    if stop not in free[1, ids.shape[1]:]:  # the other sequence did not stop
        assert torch.equal(out[1], free[1])


def test_streaming_yields_the_generated_tokens_in_order():
    _, fast = _optimized("gpt2")
    ids = _prompt()
    seen = []
    out = fast.generate(ids, 8, streamer=seen.append, stop_tokens=[])
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])
    assert [t.tolist() for t in fast.stream(ids, 8, stop_tokens=[])] == [t.tolist() for t in seen]
    assert len(fast.timing.steps_s) == 7 and fast.timing.prefill_s > 0


def test_a_prompt_longer_than_the_cache_and_bad_options_get_clear_errors():
    _, fast = _optimized("gpt2")
    with pytest.raises(ConfigError, match="needs 140 positions; this model holds 128"):
        fast.generate(_prompt(1, 100), 40)
    with pytest.raises(ConfigError, match="unknown options"):
        fast.generate(_prompt(), 4, beams=2)
    with pytest.raises(ConfigError, match="pad prompts on the left"):
        fast.generate(_prompt(), 4, attention_mask=torch.tensor([[1] * 6 + [0]] * 2))
    with pytest.raises(ConfigError, match="token ids must be in 0..511"):
        fast.generate(torch.tensor([[3, 600]]), 4)


@pytest.mark.parametrize("mode", ["eval", "mixed"])
def test_the_users_model_is_not_changed(mode):
    model = _model("llama")
    if mode == "mixed":  # a user's own choice per module survives too
        model.train()
        model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    optim.optimize(model, "cpu", _prompt(), pipeline="cleanup", measure_latency=False)
    assert model.config._attn_implementation == attn
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_save_then_load_in_a_fresh_process_generates_the_same_tokens(backend, tmp_path):
    _, fast = _optimized("llama", backend)
    ids = _prompt(2, 9, seed=7)
    want = fast.generate(ids, 16)
    fast.save(tmp_path / "saved")
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import torch, optim
        fast = optim.load({str(tmp_path / 'saved')!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        print(fast.generate(ids, 16).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert eval(out.stdout.strip().splitlines()[-1]) == want.tolist()


def test_perplexity_through_the_cache_equals_the_original_on_real_text():
    from optim.zoo import char_lm

    model = char_lm.load()
    text = char_lm.batches("test", 4, 2, seed=1)
    fast = optim.optimize(model, "cpu", text[0][:2, :32], pipeline="cleanup",
                          eval_data=text, measure_latency=False)
    ppl = fast.report["fidelity"]["perplexity"]
    assert abs(ppl["relative_change"]) < 1e-5 and ppl["tokens"] == 2 * 4 * 127
    assert abs(ppl["original"] - char_lm.perplexity(model, text)) < 1e-4
    assert fast.report["fidelity"]["greedy"]["identical"]


def test_cli_generates_from_a_save_and_a_pipeline_file_generates(tmp_path):
    from typer.testing import CliRunner

    from optim.cli import app
    from optim.runner import run_pipeline_file

    _, fast = _optimized("gpt2")
    fast.save(tmp_path / "gpt2")
    want = fast.generate([[5, 6, 7]], 4, stop_tokens=[])[0, 3:].tolist()
    out = CliRunner().invoke(app, ["generate", str(tmp_path / "gpt2"), "--ids", "5,6,7", "-n",
                                   "4"])
    assert out.exit_code == 0, out.output
    assert out.output.split()[:4] == [str(t) for t in want]
    bad = CliRunner().invoke(app, ["generate", str(tmp_path / "gpt2"), "--prompt", "hi"])
    assert bad.exit_code == 2 and "names no tokenizer" in bad.output

    pipe = tmp_path / "gen.yaml"
    pipe.write_text("version: 1\nmodel: {zoo: char_lm}\ninputs: {data: text, batch: 2, seq: 32, "
                    "count: 1}\nbackend: torch\nmeasure_latency: false\npasses: [cleanup]\n"
                    "generate: {prompt: 'The while loop', max_new_tokens: 8}\n")
    (report,) = run_pipeline_file(pipe, save=tmp_path / "clm")
    assert report["fidelity"]["greedy"]["identical"]
    assert abs(report["fidelity"]["perplexity"]["relative_change"]) < 1e-5
    again = CliRunner().invoke(app, ["generate", str(tmp_path / "clm"), "--prompt", "The while",
                                     "-n", "8"])  # the byte tokenizer was saved with it
    assert again.exit_code == 0 and again.output.startswith("The while"), again.output


def test_a_saved_decoder_carries_its_tokenizer_inside_the_save(tmp_path):
    """A Hugging Face tokenizer is copied into the save and checksummed with it; loading uses
    the copy, never a path outside the save (an older save's path is ignored)."""
    import json

    from optim.tokenizers import load_tokenizer
    from optim.zoo import minilm_path

    _, fast = _optimized("gpt2")
    fast.tokenizer = str(minilm_path())
    try:
        fast.save(tmp_path / "d")
    finally:
        fast.tokenizer = None
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"dir": "tokenizer"}
    assert "tokenizer/tokenizer.json" in manifest["files"]
    again = optim.load(tmp_path / "d")
    assert again.tokenizer == str(tmp_path / "d" / "tokenizer")
    text = "The quick brown fox jumps over the lazy dog."
    assert (load_tokenizer(again.tokenizer).encode(text)
            == load_tokenizer(str(minilm_path())).encode(text))
    manifest["tokenizer"] = str(minilm_path())  # as an older optim wrote it
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    assert optim.load(tmp_path / "d").tokenizer is None
    with open(tmp_path / "d" / "tokenizer" / "tokenizer.json", "a") as f:
        f.write("injected\n")
    with pytest.raises(optim.errors.OptimError, match="tokenizer/tokenizer.json has changed"):
        optim.load(tmp_path / "d")


def test_tvm_says_plainly_that_it_does_not_generate_yet():
    from optim.errors import BackendError

    with pytest.raises(BackendError, match="generation on the tvm backend.*torch and "
                                           "onnxruntime"):
        optim.optimize(_model("gpt2"), "cpu", _prompt(), pipeline="cleanup", backend="tvm",
                       measure_latency=False)


def test_onnxruntime_decoders_spin_and_shrink_their_arena_also_after_loading(tmp_path):
    _, fast = _optimized("llama", "onnxruntime")
    art = fast.step.artifact
    assert art.spin_wait and art.memory_arena == "shrink"
    fast.save(tmp_path / "d")
    again = optim.load(tmp_path / "d").step.artifact
    assert again.spin_wait and again.memory_arena == "shrink"
