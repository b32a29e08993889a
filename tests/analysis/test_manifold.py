"""Manifold sampling against direct x̂ᵀMx̂ over all tokens; streaming equals one pass; hover texts."""

import pytest
import torch

from bilae import DataError, UsageError
from bilae.analysis import hover_texts, sample_manifold, spectrum


class Tok:
    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def make_batches(n=3, b=2, t=5, d=6):
    batches = []
    for i in range(n):
        acts = torch.randn(b, t, d, dtype=torch.float64)
        mask = torch.rand(b, t) > 0.3
        ids = torch.arange(b * t).reshape(b, t) + 100 * i
        batches.append((acts, mask, ids))
    return batches


def direct(batches, m):
    """All real tokens: value, coords, token id, global sequence, position."""
    axes = spectrum(m).top(3)
    rows = []
    for i, (acts, mask, ids) in enumerate(batches):
        for r in range(acts.shape[0]):
            for p in range(acts.shape[1]):
                if mask[r, p]:
                    x = acts[r, p] / acts[r, p].norm()
                    rows.append((float(x @ m @ x), x @ axes, int(ids[r, p]), i * acts.shape[0] + r, p))
    return sorted(rows, key=lambda row: -abs(row[0]))


def test_sample_equals_direct_top_k():
    batches = make_batches()
    a = torch.randn(6, 6, dtype=torch.float64)
    m = (a + a.T) / 2
    k = 7
    sample = sample_manifold(iter(batches), m, k=k)
    expected = direct(batches, m)[:k]
    assert len(sample) == k
    assert torch.allclose(sample.values, torch.tensor([row[0] for row in expected], dtype=torch.float64))
    assert torch.allclose(sample.coords, torch.stack([row[1] for row in expected]))
    assert sample.token_ids.tolist() == [row[2] for row in expected]
    assert sample.sequence.tolist() == [row[3] for row in expected]
    assert sample.position.tolist() == [row[4] for row in expected]
    assert torch.allclose(sample.eigenvalues, spectrum(m).eigenvalues[:3])
    assert torch.all(sample.values.abs()[:-1] >= sample.values.abs()[1:])


def test_streaming_equals_one_batch_and_asymmetric_form_is_symmetrised():
    batches = make_batches(n=4)
    m = torch.randn(6, 6, dtype=torch.float64)
    one = (
        torch.cat([b[0] for b in batches]),
        torch.cat([b[1] for b in batches]),
        torch.cat([b[2] for b in batches]),
    )
    streamed = sample_manifold(batches, m, k=5)
    single = sample_manifold([one], (m + m.T) / 2, k=5)
    assert torch.allclose(streamed.values, single.values)
    assert streamed.token_ids.tolist() == single.token_ids.tolist()
    assert streamed.sequence.tolist() == single.sequence.tolist()


def test_fewer_tokens_than_k_keeps_all():
    batches = make_batches(n=1)
    sample = sample_manifold(batches, torch.eye(6, dtype=torch.float64), k=1000)
    assert len(sample) == int(batches[0][1].sum())
    assert torch.allclose(sample.values, torch.ones(len(sample), dtype=torch.float64))  # x̂ᵀ I x̂ = 1


def test_context_predictions_and_hover():
    acts = torch.randn(1, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True]])
    ids = torch.tensor([[7, 8, 9, 10]])
    preds = torch.tensor([[1, 2, 3, 4]])
    m = torch.zeros(3, 3, dtype=torch.float64)
    m[0, 0] = 1.0
    sample = sample_manifold([(acts, mask, ids, preds)], m, k=3, context=2)
    by_pos = {p: i for i, p in enumerate(sample.position.tolist())}
    assert sample.context[by_pos[3]].tolist() == [8, 9]
    assert sample.context[by_pos[1]].tolist() == [-1, -1]  # position 0 is masked, -1 is outside
    assert sample.predictions[by_pos[2]].item() == 3
    texts = hover_texts(sample, Tok())
    assert texts[by_pos[3]] == "… w8 w9 [ w10] →  w4"
    logits = torch.zeros(3, 20)
    logits[:, 11] = 1.0
    assert hover_texts(sample, Tok(), logits)[by_pos[1]] == "… [ w8] →  w11"
    no_pred = sample_manifold([(acts, mask, ids)], m, k=1, context=1)
    assert "→" not in hover_texts(no_pred, Tok())[0]


def test_empty_sample_is_a_data_error():
    acts = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(DataError, match="no real"):
        sample_manifold([(acts, mask, torch.zeros(2, 3, dtype=torch.long))], torch.eye(4), k=3)
    with pytest.raises(DataError, match="empty"):
        sample_manifold([], torch.eye(4), k=3)


def test_bad_inputs():
    batch = (torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(UsageError, match="d=4"):
        sample_manifold([batch], torch.eye(6), k=2)
    with pytest.raises(UsageError, match="k must be positive"):
        sample_manifold([batch], torch.eye(4), k=0)
    with pytest.raises(UsageError, match=r"mask \(B, T\)"):
        sample_manifold([(batch[0], batch[1][0], batch[2])], torch.eye(4), k=2)
