"""Prompt tuning: soft prompt prepended in embedding space, logits aligned with the real tokens."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunekit.modules.peft import PromptTuning, extend_mask_with_prefix, trainable_parameters

VOCAB, DIM = 50, 16


class ToyDecoder(nn.Module):
    """One attention layer with a position-dependent bias: enough to see mask and input_pos."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.qk = nn.Linear(DIM, 2 * DIM, bias=False)
        self.pos = nn.Embedding(64, DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward_embeddings(self, h, mask, input_pos):
        b, s, _ = h.shape
        if input_pos is None:
            input_pos = torch.arange(s).expand(b, s)
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
        h = h + self.pos(input_pos)
        q, k = self.qk(h).chunk(2, dim=-1)
        return self.output(F.scaled_dot_product_attention(q, k, h, attn_mask=mask))

    def forward(self, tokens, *, mask=None, input_pos=None):
        return self.forward_embeddings(self.tok_embeddings(tokens), mask, input_pos)


def test_extend_mask_with_prefix_literal():
    # two packed documents of length 2 and a prefix of 2 virtual tokens
    doc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(extend_mask_with_prefix(doc[None], 2)[0], expected)


def test_prompt_tuning_matches_explicit_prefix_in_embedding_space():
    torch.manual_seed(0)
    decoder = ToyDecoder()
    wrapped = PromptTuning(decoder, n_virtual_tokens=3, init_token_ids=[4, 5, 6])
    with torch.no_grad():
        decoder.tok_embeddings.soft_prompt.add_(torch.randn(3, DIM))
    prompt = decoder.tok_embeddings.soft_prompt
    tokens = torch.randint(0, VOCAB, (2, 4))
    embeds = torch.cat([prompt.expand(2, 3, DIM), F.embedding(tokens, decoder.tok_embeddings.weight)], dim=1)

    # plain causal rows
    ref = decoder.forward_embeddings(embeds, None, None)[:, 3:]
    torch.testing.assert_close(wrapped(tokens), ref)

    # packed rows: documents [0, 1] and [2, 3], per-document positions
    doc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool).expand(2, 4, 4)
    pos = torch.tensor([0, 1, 0, 1]).expand(2, 4)
    full_mask = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool).expand(2, 7, 7)
    full_pos = torch.tensor([0, 1, 2, 3, 4, 3, 4]).expand(2, 7)
    ref = decoder.forward_embeddings(embeds, full_mask, full_pos)[:, 3:]
    out = wrapped(tokens, mask=doc, input_pos=pos)
    assert out.shape == (2, 4, VOCAB)
    torch.testing.assert_close(out, ref)


def test_only_soft_prompt_trains_and_decoder_unchanged_for_real_ids():
    torch.manual_seed(0)
    decoder = ToyDecoder()
    tokens = torch.randint(0, VOCAB, (2, 5))
    before = decoder(tokens)
    weight = decoder.tok_embeddings.weight
    wrapped = PromptTuning(decoder, n_virtual_tokens=2, generator=torch.Generator().manual_seed(0))
    assert decoder.tok_embeddings.weight is weight  # same tensor, same state-dict key
    assert "decoder.tok_embeddings.weight" in wrapped.state_dict()
    torch.testing.assert_close(decoder(tokens), before)  # real ids alone: the original model
    assert set(trainable_parameters(wrapped)) == {"decoder.tok_embeddings.soft_prompt"}
    wrapped(tokens).sum().backward()
    assert decoder.tok_embeddings.soft_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "soft_prompt" not in n)


def test_prompt_tuning_errors():
    with pytest.raises(ValueError, match="n_virtual_tokens"):
        PromptTuning(ToyDecoder(), n_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(ToyDecoder(), n_virtual_tokens=2, init_token_ids=[1, VOCAB])


def test_prompt_tuning_on_tunekit_llama_matches_hf_inputs_embeds(tmp_path):
    transformers = pytest.importorskip("transformers")
    try:
        from tunekit.models import from_hf
    except ImportError as e:  # the model stack is written in parallel
        pytest.skip(f"tunekit model stack not available: {e}")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path))
    wrapped = PromptTuning(from_hf(tmp_path, dtype=torch.float32), n_virtual_tokens=4)
    with torch.no_grad():
        wrapped.decoder.tok_embeddings.soft_prompt.add_(torch.randn(4, 64) * 0.1)
    prompt = wrapped.decoder.tok_embeddings.soft_prompt.detach()
    tokens = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        embeds = torch.cat([prompt.expand(2, 4, 64), hf.get_input_embeddings()(tokens)], dim=1)
        ref = hf(inputs_embeds=embeds).logits[:, 4:]
        torch.testing.assert_close(wrapped(tokens), ref, atol=1e-4, rtol=1e-4)
