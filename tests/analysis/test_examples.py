"""Max/min-activating contexts against a brute-force sort of all tokens; formatting."""

import pytest
import torch

from bilae import Autoencoder, DataError, UsageError
from bilae.analysis import collect_examples, context_records, to_ansi, to_html, to_rows


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
        "latent": 0, "which": "max", "value": 3.0, "sequence": 0, "position": 2,
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
