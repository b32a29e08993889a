"""Max/min-activating contexts against a brute-force sort of all tokens; the sign rule; detokenisation; formatting."""

import pytest
import torch

from bilae import Autoencoder, DataError, UsageError
from bilae.analysis import collect_examples, context_records, to_ansi, to_html, to_rows
from bilae.analysis.text import PAD, decode_pieces, decode_with_token


class Tok:
    def decode(self, ids):
        return "".join("<&>" if i == 5 else f" w{i}" for i in ids)


@pytest.fixture
def coder():
    return Autoencoder.from_config("vanilla", d_model=4, layer=0, expansion=2).double()


def make_batches(n=3, b=2, t=6, d=4):
    out = []
    for i in range(n):
        mask = torch.rand(b, t) > 0.25
        out.append(
            (torch.randn(b, t, d, dtype=torch.float64), mask, torch.arange(b * t).reshape(b, t) + 100 * i)
        )
    return out


def brute(batches, coder, latent):
    """(value, sequence, position) of every real token for one latent."""
    rows = []
    for i, (acts, mask, _) in enumerate(batches):
        f = coder.features(acts)[..., latent].detach()
        for r, p in mask.nonzero().tolist():
            rows.append((float(f[r, p]), i * acts.shape[0] + r, p))
    return rows


def test_examples_equal_brute_force(coder):
    batches = make_batches()
    ex = collect_examples(batches, coder.features, indices=[5, 1], k=4)
    assert ex.indices.tolist() == [5, 1]
    for row, latent in enumerate([5, 1]):
        rows = brute(batches, coder, latent)
        top, bottom = sorted(rows, reverse=True)[:4], sorted(rows)[:4]
        # The sign rule: "max" is the direction of the activation of largest magnitude.
        sign = 1 if top[0][0] >= -bottom[0][0] else -1
        assert int(ex.signs[row]) == sign
        if sign < 0:
            top, bottom = bottom, top
        assert torch.allclose(ex.max.values[row], torch.tensor([v for v, _, _ in top], dtype=torch.float64))
        assert torch.allclose(
            ex.min.values[row], torch.tensor([v for v, _, _ in bottom], dtype=torch.float64)
        )
        assert ex.max.sequence[row].tolist() == [s for _, s, _ in top]
        assert ex.min.position[row].tolist() == [p for _, _, p in bottom]


def test_all_latents_by_default_and_one_pass_equals_streaming(coder):
    batches = make_batches()
    streamed = collect_examples(batches, coder.features, k=3)
    one = tuple(torch.cat([b[i] for b in batches]) for i in range(3))
    single = collect_examples([one], coder.features, k=3)
    assert streamed.indices.tolist() == list(range(8))
    assert torch.allclose(streamed.max.values, single.max.values)
    assert torch.equal(streamed.min.windows, single.min.windows)


def test_windows_and_records():
    acts = torch.zeros(1, 5, 1)
    acts[0, 2, 0] = 3.0
    acts[0, 4, 0] = -1.0
    mask = torch.tensor([[False, True, True, True, True]])
    ids = torch.tensor([[1, 5, 3, 4, 9]])
    ex = collect_examples([(acts, mask, ids)], lambda x: x, k=1, before=3, after=1)
    assert ex.max.windows[0, 0].tolist() == [-1, -1, 5, 3, 4]  # outside, masked, then tokens
    assert ex.min.windows[0, 0].tolist() == [5, 3, 4, 9, -1]
    (rec,) = context_records(ex, Tok(), 0, "max")
    assert (rec.value, rec.before, rec.token, rec.after) == (3.0, ["<&>"], " w3", [" w4"])
    assert "\x1b[1;30;42m w3\x1b[0m" in to_ansi(rec)
    page = to_html([rec], title="latent <0>")
    assert "&lt;&amp;&gt;" in page and "latent &lt;0&gt;" in page and "<&>" not in page
    assert '<span style="background:rgba(34,139,34,1.00);font-weight:bold"> w3</span>' in page
    (mn,) = context_records(ex, Tok(), 0, "min")
    assert "rgba(200,40,40" in to_html([mn])
    assert to_rows([rec])[0] == {
        "latent": 0, "which": "max", "sign": 1, "value": 3.0, "sequence": 0, "position": 2,
        "before": "<&>", "token": " w3", "after": " w4",
    }  # fmt: skip


def test_errors(coder):
    empty = (torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(DataError, match="no real"):
        collect_examples([empty], coder.features)
    batches = make_batches(n=1)
    with pytest.raises(UsageError, match=r"latent index 8 is out of range; valid: 0 to 7"):
        collect_examples(batches, coder.features, indices=[8])
    ex = collect_examples(batches, coder.features, indices=[2], k=2)
    with pytest.raises(UsageError, match="latent 3 was not collected"):
        context_records(ex, Tok(), 3)
    with pytest.raises(UsageError, match="'max' or 'min'"):
        context_records(ex, Tok(), 2, "top")


# --------------------------------------------------------------------------------------------- the sign rule
def test_a_latent_with_a_negative_signal_shows_its_most_negative_values_as_max():
    values = torch.tensor([[-3.0, 0.001, -2.0, -0.5, 0.0005, -1.0]])  # one latent, strongly negative
    batch = (values[..., None], torch.ones(1, 6, dtype=torch.bool), torch.arange(6)[None])
    ex = collect_examples([batch], lambda x: x, k=2, before=1, after=0)
    assert ex.signs.tolist() == [-1]
    assert ex.max.values[0].tolist() == [-3.0, -2.0]  # the evidence: strongest in the signal's direction
    assert ex.min.values[0].tolist() == pytest.approx([0.001, 0.0005])  # the other direction
    top = context_records(ex, Tok(), 0, "max")
    assert [r.value for r in top] == [-3.0, -2.0] and all(r.sign == -1 for r in top)
    assert "negative signal: max shows its most negative values" in to_html(top, title="latent 0")
    # A latent of either sign: ties go to the positive direction.
    both = torch.tensor([[2.0, -2.0, 1.0]])
    ex = collect_examples([(both[..., None], torch.ones(1, 3, dtype=torch.bool), torch.arange(3)[None])],
                          lambda x: x, k=1)  # fmt: skip
    assert ex.signs.tolist() == [1] and ex.max.values.tolist() == [[2.0]]


# ------------------------------------------------------------------------------------------ detokenisation
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here (GPT-2/Qwen style: spaces are part of the tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The cat sat on the mat. The dog sat too. "] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_wordpiece_contexts_read_as_the_tokenizer_writes_them(minilm):
    _, tokenizer = minilm
    ids = tokenizer("defined objects, the __setitem__( method", add_special_tokens=False)["input_ids"]
    assert "##ite" in tokenizer.convert_ids_to_tokens(ids)  # the word is split into pieces
    pieces = decode_pieces(tokenizer, [PAD, *ids, PAD])
    assert "".join(pieces) == tokenizer.decode(ids) and not any("##" in p for p in pieces)
    assert len(pieces) == len(ids) and "ite" in pieces
    # A window that starts inside a word drops the continuation mark too.
    start = tokenizer.convert_ids_to_tokens(ids).index("##ite")
    assert not decode_pieces(tokenizer, ids[start:])[0].startswith("##")
    # Records of a real collection: the context reads like the text.
    acts = torch.zeros(1, len(ids), 1)
    acts[0, start, 0] = 1.0
    batch = (acts, torch.ones(1, len(ids), dtype=torch.bool), torch.tensor([ids]))
    (rec,) = context_records(collect_examples([batch], lambda x: x, k=1, before=4, after=3), tokenizer, 0)
    window = tokenizer.decode(ids[start - 4 : start + 4])  # BERT's own spelling: "the _ _ setitem _ _"
    assert "".join(rec.before) + rec.token + "".join(rec.after) == window
    assert rec.token == "ite" and "".join(rec.before).endswith("set") and "##" not in to_ansi(rec)


def test_bpe_contexts_keep_their_spaces_and_whole_characters():
    tokenizer = bpe_tokenizer()
    ids = tokenizer("The cat sat on the mat", add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(tokenizer, ids)
    assert "".join(pieces) == "The cat sat on the mat" and " mat" in pieces
    # "é" is two bytes the tokenizer never merged: the first byte's token owns nothing, the second the character.
    ids = tokenizer("The café", add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(tokenizer, ids)
    assert "".join(pieces) == "The café" and "\ufffd" not in "".join(pieces) and "" in pieces
    context, token = decode_with_token(tokenizer, ids[:-1], ids[-1])
    assert context + token == "The café" and "\ufffd" not in context + token
    assert decode_pieces(None, [3, PAD, 4]) == ["<3>", "<4>"]
