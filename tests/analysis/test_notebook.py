"""The seed notebook's Feature and Manifold on a fake harvest function."""

import plotly.graph_objects as go
import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import Feature, Manifold, collect_examples, latent_form, sample_manifold
from bilae.analysis.notebook import token_batches

D = 6


class Tok:
    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


@pytest.fixture
def table():
    return torch.randn(50, D)


@pytest.fixture
def harvest(table):
    def run(input_ids, attention_mask):
        return table[input_ids], attention_mask.bool()

    return run


@pytest.fixture
def dataset():
    ids = torch.randint(0, 50, (10, 7))
    mask = torch.ones(10, 7, dtype=torch.long)
    mask[::3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def direct_batches(dataset, table, size, steps):
    for i in range(0, size * steps, size):
        ids, mask = dataset["input_ids"][i : i + size], dataset["attention_mask"][i : i + size]
        yield table[ids], mask.bool(), ids


def test_token_batches_slices_dicts_and_row_lists(dataset):
    batches = list(token_batches(dataset, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    rows = [
        {"input_ids": dataset["input_ids"][i], "attention_mask": dataset["attention_mask"][i]}
        for i in range(10)
    ]
    from_rows = list(token_batches(rows, batch_size=4, max_steps=2))
    assert len(from_rows) == 2 and torch.equal(from_rows[1]["input_ids"], dataset["input_ids"][4:8])
    with pytest.raises(UsageError, match="batch_size must be positive"):
        list(token_batches(dataset, batch_size=0))
    with pytest.raises(UsageError, match="must be a dict with 'input_ids'"):
        list(token_batches([torch.zeros(2, 3)]))


def test_feature_matches_collect_examples_and_prints(dataset, table, harvest, capsys):
    coder = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2)
    vis = Feature(coder, Tok(), dataset, harvest, max_steps=2, batch_size=4, k=3)
    expected = collect_examples(direct_batches(dataset, table, 4, 2), coder.features, k=3)
    assert torch.allclose(vis.examples.max.values, expected.max.values)
    assert torch.equal(vis.examples.min.windows, expected.min.windows)
    vis([3, 7], k=2)  # the seed calls the Feature object itself
    out = capsys.readouterr().out
    assert "latent 3" in out and "latent 7" in out and out.count("\x1b[1;30;42m") == 4
    assert out.count("\x1b[1;30;41m") == 4
    page = vis.html(3, k=1, which=("max",))
    assert page.count("<span") == 1 and "latent 3" in page
    with pytest.raises(UsageError, match="latent 99 was not collected"):
        vis.vis([99])


def test_manifold_values_figures_and_dataframe(dataset, table, harvest):
    coder = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2)
    form = latent_form(coder, 2, k=4)
    manifold = Manifold(dataset, harvest, Tok(), form.matrix.detach(), max_steps=3, batch_size=3, total=12)
    expected = sample_manifold(direct_batches(dataset, table, 3, 3), form.matrix.detach(), k=12)
    assert torch.allclose(manifold.sample.values, expected.values, atol=1e-6)
    lam = torch.linalg.eigvalsh(form.matrix.detach())
    assert torch.allclose(manifold.axes.eigenvalues, lam[lam.abs().argsort(descending=True)], atol=1e-6)
    spec = manifold.spectrum()
    assert isinstance(spec, go.Figure) and len(spec.data[0].y) == D
    fig = manifold(k=5)
    (trace,) = fig.data
    assert isinstance(trace, go.Scatter3d) and len(trace.x) == 5
    assert trace.marker.cmid == 0 and len(trace.hovertext) == 5 and trace.hovertext[0].startswith("…")
    frame = manifold.to_dataframe(k=4)
    assert list(frame.columns[:5]) == ["x", "y", "z", "value", "token"] and len(frame) == 4
    assert frame["value"].tolist() == pytest.approx(expected.values[:4].tolist(), abs=1e-6)


def test_manifold_with_predictions(dataset, harvest):
    predict = lambda ids, mask: (ids + 1) % 50  # noqa: E731
    manifold = Manifold(dataset, harvest, Tok(), torch.eye(D), batch_size=5, total=4, predict=predict)
    first = manifold.sample
    assert first.predictions.tolist() == ((first.token_ids + 1) % 50).tolist()
    assert all("→" in text for text in manifold.hover)


def test_feature_uses_coder_hooked_and_refuses_without_one(dataset, table, harvest):
    coder = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2)
    with pytest.raises(UsageError, match=r"Feature needs a harvest function.*coder\.hooked"):
        Feature(coder, Tok(), dataset)
    coder.hooked = harvest
    vis = Feature(coder, Tok(), dataset, max_steps=2, batch_size=4, k=3)  # the seed's argument list
    expected = collect_examples(direct_batches(dataset, table, 4, 2), coder.features, k=3)
    assert torch.allclose(vis.examples.max.values, expected.max.values)


def test_hf_dataset_rows_are_batched_by_32_with_ragged_rows_padded(table, harvest):
    from datasets import Dataset

    lengths = [3 + i % 5 for i in range(70)]
    rows = [{"text": "x", "input_ids": list(range(1, n + 1)), "attention_mask": [1] * n} for n in lengths]
    dataset = Dataset.from_list(rows).with_format("torch")
    batches = list(token_batches(dataset, batch_size=32))
    assert [b["input_ids"].shape for b in batches] == [(32, 7), (32, 7), (6, 7)]
    assert batches[0]["attention_mask"].sum(1).tolist() == lengths[:32]
    manifold = Manifold(dataset, harvest, Tok(), torch.eye(D), total=10_000)  # batch_size defaults to 32
    assert len(manifold.sample) == sum(lengths) and int(manifold.sample.sequence.max()) == 69


def test_token_batches_take_iterables_of_batches_as_they_are(dataset):
    batch = {"input_ids": dataset["input_ids"][:4], "attention_mask": dataset["attention_mask"][:4]}
    assert [b["input_ids"].shape for b in token_batches(iter([batch, batch]), batch_size=32)] == [(4, 7)] * 2
    assert [b["input_ids"].shape for b in token_batches([batch, batch], batch_size=32)] == [(4, 7)] * 2
    no_mask = list(token_batches({"input_ids": dataset["input_ids"]}, batch_size=5))
    assert no_mask[0]["attention_mask"].tolist() == [[1] * 7] * 5


def test_manifold_accepts_a_lifted_form(dataset, table, harvest):
    lifted = torch.randn(D + 1, D + 1)
    manifold = Manifold(dataset, harvest, Tok(), lifted, batch_size=4, total=1000)
    acts = table[dataset["input_ids"]][dataset["attention_mask"].bool()]
    xhat = acts / acts.norm(dim=-1, keepdim=True)
    z = torch.cat([torch.ones(len(xhat), 1), xhat], 1)
    sym = (lifted + lifted.T) / 2
    values = ((z @ sym) * z).sum(-1)
    expected = values[values.abs().argsort(descending=True)]
    assert torch.allclose(manifold.sample.values, expected, atol=1e-5)
    assert manifold.sample.coords.shape == (len(expected), 3)
    with pytest.raises(UsageError, match=r"d=6 but the form is \(8, 8\); valid: \(d, d\), or \(d\+1, d\+1\)"):
        Manifold(dataset, harvest, Tok(), torch.eye(D + 2), batch_size=4)
