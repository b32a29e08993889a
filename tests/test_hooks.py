"""Harvesting: the captured input of block N equals HF's hidden_states[N], later blocks never run, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from bilae.errors import UsageError
from bilae.hooks import Harvester, find_layers, sink_mask
from bilae.lm import tiny_qwen3
from tests.support.lm import count_calls

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Short one."]


def batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def reference(model, tokens, layer):
    with torch.no_grad():
        return model(**tokens, output_hidden_states=True).hidden_states[layer]


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_qwen3_activations_equal_hidden_states(qwen3_tiny, layer):  # noqa: F811
    model, tokenizer = qwen3_tiny
    tokens = batch(tokenizer)
    acts, _ = Harvester(model, tokenizer, layer)(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(acts, reference(model, tokens, layer), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 3, 5])
def test_minilm_activations_equal_hidden_states(minilm, layer):  # noqa: F811
    model, tokenizer = minilm
    tokens = batch(tokenizer)
    acts, _ = Harvester(model, tokenizer, layer)(tokens["input_ids"], tokens["attention_mask"])
    assert acts.shape == (2, tokens["input_ids"].shape[1], 384)
    torch.testing.assert_close(acts, reference(model, tokens, layer), rtol=0, atol=0)


def test_forward_stops_right_after_the_hooked_layer(qwen3_tiny):  # noqa: F811
    model, tokenizer = qwen3_tiny
    harvester = Harvester(model, tokenizer, layer=2)
    modules = [*harvester.layers, model.model.norm, model.lm_head]
    counts, handles = count_calls(modules)
    try:
        tokens = batch(tokenizer)
        harvester(tokens["input_ids"], tokens["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    assert counts == [1, 1, 0, 0, 0, 0]  # blocks 0 and 1 ran; block 2, later blocks, norm and head did not


def test_model_runs_whole_again_after_harvesting(qwen3_tiny):  # noqa: F811
    model, tokenizer = qwen3_tiny
    tokens = batch(tokenizer)
    Harvester(model, tokenizer, 1)(tokens["input_ids"], tokens["attention_mask"])
    assert len(reference(model, tokens, 0)) == 2  # the stopping hook is gone: a plain forward completes
    with torch.no_grad():
        assert len(model(**tokens, output_hidden_states=True).hidden_states) == 5


def test_harvester_exposes_and_freezes_the_model(qwen3_tiny):  # noqa: F811
    model, tokenizer = qwen3_tiny
    harvester = Harvester(model, tokenizer, 3)
    assert (harvester.layer, harvester.n_layers, harvester.d_model) == (3, 4, 64)
    assert harvester.model is model and harvester.tokenizer is tokenizer
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert harvester.to("cpu") is harvester and harvester.device.type == "cpu"


def test_activations_can_feed_a_trained_module(qwen3_tiny):  # noqa: F811
    model, tokenizer = qwen3_tiny
    tokens = batch(tokenizer)
    acts, _ = Harvester(model, tokenizer, 1)(tokens["input_ids"], tokens["attention_mask"])
    assert not acts.requires_grad and not acts.is_inference()
    probe = nn.Linear(64, 3)
    probe(acts).pow(2).sum().backward()  # would fail for inference-mode tensors
    assert probe.weight.grad is not None


@pytest.mark.parametrize("layer", [-1, 4, 10])
def test_layer_out_of_range(qwen3_tiny, layer):  # noqa: F811
    model, tokenizer = qwen3_tiny
    with pytest.raises(UsageError, match=rf"layer {layer} .*valid 0\.\.3"):
        Harvester(model, tokenizer, layer)


def test_bad_sink_factor(qwen3_tiny):  # noqa: F811
    with pytest.raises(UsageError, match="sink_factor"):
        Harvester(*qwen3_tiny, 0, sink_factor=-2.0)


def test_find_layers_for_common_architectures(minilm, qwen3_tiny):  # noqa: F811
    causal = qwen3_tiny[0]
    assert find_layers(causal) is causal.model.layers
    assert find_layers(causal.model) is causal.model.layers  # base model
    assert find_layers(minilm[0]) is minilm[0].encoder.layer
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    assert find_layers(gpt2) is gpt2.transformer.h
    assert find_layers(gpt2, "transformer.h") is gpt2.transformer.h


def test_find_layers_errors_list_paths_tried():
    with pytest.raises(UsageError, match=r"model\.layers.*encoder\.layer.*transformer\.h"):
        find_layers(nn.Linear(2, 2))
    with pytest.raises(UsageError, match=r"at model\.decoder\.blocks"):
        find_layers(tiny_qwen3(n_layers=1, hidden=16, n_heads=2, n_kv_heads=1), "model.decoder.blocks")


def test_mask_excludes_padding_and_special_tokens(minilm):  # noqa: F811
    model, tokenizer = minilm
    tokens = batch(tokenizer)
    ids, attention = tokens["input_ids"], tokens["attention_mask"]
    _, mask = Harvester(model, tokenizer, 1)(ids, attention)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert mask.dtype == torch.bool
    assert torch.equal(mask, attention.bool() & ~special)
    assert not mask[:, 0].any() and mask[1].sum() == len(tokenizer("Short one.")["input_ids"]) - 2
    _, kept = Harvester(model, tokenizer, 1, exclude_special=False)(ids, attention)
    assert torch.equal(kept, attention.bool())  # [CLS]/[SEP] kept, padding still out


def test_sink_mask_flags_outliers_against_median_of_real_tokens():
    acts = torch.ones(1, 6, 4)
    acts[0, 2] *= 50  # a sink
    acts[0, 5] *= 1000  # padding: huge but must not count
    real = torch.tensor([[True, True, True, True, True, False]])
    flagged = sink_mask(acts, real, factor=10.0)
    assert flagged[0].tolist() == [False, False, True, False, False, True]
    assert not sink_mask(acts, real, factor=100.0)[0, :5].any()


def test_harvester_sink_filter(qwen3_tiny):  # noqa: F811
    model, tokenizer = qwen3_tiny
    tokens = batch(tokenizer)
    ids, attention = tokens["input_ids"], tokens["attention_mask"]
    _, plain = Harvester(model, tokenizer, 2)(ids, attention)
    _, loose = Harvester(model, tokenizer, 2, sink_factor=1e6)(ids, attention)
    _, tight = Harvester(model, tokenizer, 2, sink_factor=1.0)(ids, attention)
    assert torch.equal(loose, plain)
    assert (tight <= plain).all() and 0 < tight.sum() < plain.sum()  # above-median tokens dropped
