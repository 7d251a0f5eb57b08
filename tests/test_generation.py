"""Generation against transformers' generate: greedy token for token (with and without our KV
cache, batches with left padding; Llama, Qwen2 with q/k/v biases, Mistral with a sliding window), stop tokens, and the
sampling distributions against probabilities computed independently in float64."""

import math

import pytest
import torch

from tunekit.generation import generate, generate_ids, left_pad, next_token_probs, sample_next_token
from tunekit.models import from_hf

transformers = pytest.importorskip("transformers")

PAD = 0
PROMPTS = [[1, 5, 9, 33, 7, 12], [1, 44], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 2, 17], [1, 60, 61]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf_config(family):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=PAD)
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if family == "mistral":  # a window shorter than prompt + answer: the cache path must apply it
        return transformers.MistralConfig(**common, sliding_window=5), transformers.MistralForCausalLM
    return transformers.Qwen2Config(**common, tie_word_embeddings=False), transformers.Qwen2ForCausalLM


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def models(request, tmp_path_factory):
    """(transformers model, tunekit model loaded from its save_pretrained folder)."""
    config, cls = _hf_config(request.param)
    torch.manual_seed(0)
    hf = cls(config).eval()
    if request.param == "qwen2":  # random non-zero q/k/v biases, so a wrong bias path shows
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                torch.nn.init.normal_(proj.bias, std=0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, from_hf(path)


def hf_greedy(hf, prompt, n, eos=None):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_single_prompt_matches_transformers(models, use_cache):
    hf, ours = models
    prompt = PROMPTS[0]
    ref = hf_greedy(hf, prompt, 32)
    got = generate(ours, torch.tensor([prompt]), max_new_tokens=32, use_cache=use_cache)
    assert got.tolist()[0] == ref
    assert len(set(ref)) > 3  # the reference is not a degenerate repetition of one token
    assert not ours.caches_are_enabled()  # generate removes the caches it set up


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_left_padded_batch_matches_transformers(models, use_cache):
    hf, ours = models
    tokens, is_token = left_pad(PROMPTS, PAD)
    got = generate(ours, tokens, is_token=is_token, max_new_tokens=32, use_cache=use_cache).tolist()
    # each row equals transformers run on that prompt alone (no padding) ...
    assert got == [hf_greedy(hf, p, 32) for p in PROMPTS]
    # ... and transformers' own left-padded batch
    hf_out = hf.generate(tokens, attention_mask=is_token.long(), max_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD)
    assert got == hf_out[:, tokens.shape[1]:].tolist()


def test_stop_tokens_finish_rows_independently(models):
    hf, ours = models
    refs = [hf_greedy(hf, p, 32) for p in PROMPTS[:2]]
    # a stop id that row 0 produces first at step k and that row 1 does not produce before step k+2
    k, stop = next((i, t) for i, t in enumerate(refs[0]) if i >= 3 and t not in refs[0][:i] and t not in refs[1][:i + 2])
    got = generate_ids(ours, PROMPTS[:2], max_new_tokens=32, stop_tokens=[stop], pad_id=PAD)
    assert got[0] == refs[0][:k + 1]  # row 0 stops at the stop token (kept), row 1 goes on
    row1_stop = refs[1].index(stop) if stop in refs[1] else None
    assert got[1] == (refs[1] if row1_stop is None else refs[1][:row1_stop + 1])
    # when every row has stopped, generation ends: the tensor is no longer than needed
    out = generate(ours, torch.tensor([PROMPTS[0]]), max_new_tokens=32, stop_tokens=[stop])
    assert out.shape == (1, k + 1)
    # transformers with the same eos agrees
    assert got[0] == hf_greedy(hf, PROMPTS[0], 32, eos=stop)


def test_rows_after_stop_are_padded(models):
    _, ours = models
    ref = generate_ids(ours, PROMPTS[:2], max_new_tokens=12)
    stop = ref[1][2]
    out = generate(ours, *left_pad(PROMPTS[:2], PAD)[:1], is_token=left_pad(PROMPTS[:2], PAD)[1],
                   max_new_tokens=12, stop_tokens=[stop], pad_id=PAD)
    first = ref[1].index(stop)
    assert out[1, :first + 1].tolist() == ref[1][:first + 1]
    assert (out[1, first + 1:] == PAD).all()


def test_top_k_1_equals_greedy(models):
    _, ours = models
    greedy = generate_ids(ours, PROMPTS, max_new_tokens=16)
    sampled = generate_ids(ours, PROMPTS, max_new_tokens=16, temperature=1.3, top_k=1,
                           generator=torch.Generator().manual_seed(5))
    assert sampled == greedy


def test_seeded_sampling_is_reproducible(models):
    _, ours = models
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = generate_ids(ours, PROMPTS, generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate_ids(ours, PROMPTS, generator=torch.Generator().manual_seed(1), **kwargs)
    c = generate_ids(ours, PROMPTS, generator=torch.Generator().manual_seed(2), **kwargs)
    assert a == b and a != c
    # the no-cache path draws the same samples from the same generator
    d = generate_ids(ours, PROMPTS, generator=torch.Generator().manual_seed(1), use_cache=False, **kwargs)
    assert d == a


def _expected_probs(logits, temperature, top_k=None, top_p=None):
    """float64 reference: softmax(logits / T) restricted to the top-k, then to the nucleus."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k] if top_k else order)
    m = max(z)
    w = {i: math.exp(z[i] - m) for i in keep}
    total = sum(w.values())
    p = {i: w[i] / total for i in keep}
    if top_p is not None:
        nucleus, mass = set(), 0.0
        for i in sorted(keep, key=lambda i: -p[i]):
            nucleus.add(i)
            mass += p[i]
            if mass >= top_p:
                break
        total = sum(p[i] for i in nucleus)
        p = {i: p[i] / total for i in nucleus}
    return [p.get(i, 0.0) for i in range(len(logits))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.5, 4, None),
                                                     (1.0, None, 0.8), (0.8, 5, 0.6)])
def test_sampled_frequencies_match_probabilities(temperature, top_k, top_p):
    logits = [2.0, 1.5, 0.3, -0.4, 1.1, 0.0, -1.2, 0.9]
    expected = _expected_probs(logits, temperature, top_k, top_p)
    probs = next_token_probs(torch.tensor([logits]), temperature=temperature, top_k=top_k, top_p=top_p)[0]
    assert probs.tolist() == pytest.approx(expected, abs=1e-6)
    n = 40_000
    draws = sample_next_token(torch.tensor([logits]).expand(n, -1), temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(logits)).double() / n
    for i, p in enumerate(expected):
        if p == 0:
            assert freq[i] == 0, f"token {i} is filtered out but was drawn"
        else:
            assert abs(freq[i] - p) < 5 * math.sqrt(p * (1 - p) / n), (i, float(freq[i]), p)


def test_first_sampled_token_follows_the_model_distribution(models):
    """End to end: the first token sampled for many copies of a prompt is distributed like
    transformers' softmax(logits / T) of that prompt."""
    hf, ours = models
    prompt, temperature, n = PROMPTS[1], 1.5, 6000
    with torch.no_grad():
        p = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / temperature, dim=-1)
    draws = generate(ours, torch.tensor([prompt]).expand(n, -1), max_new_tokens=1, temperature=temperature,
                     generator=torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=p.numel()).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-3).all()
    # total variation distance, for a scale-free sanity bound
    assert 0.5 * (freq - p).abs().sum() < 0.1


def test_bad_arguments_raise_clear_errors(models):
    _, ours = models
    tokens, is_token = left_pad(PROMPTS, PAD)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, tokens.flip(1), is_token=is_token.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        generate(ours, tokens, is_token=is_token, max_new_tokens=120)
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, tokens, is_token=is_token, max_new_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, tokens, is_token=is_token, max_new_tokens=0)
    assert not ours.caches_are_enabled()
