"""The seed notebook's helper functions (``from bilae.analysis.functions import *``) against explicit formulas."""

import math

import torch

import bilae.analysis.functions as functions


def test_star_import_gives_the_notebooks_names():
    names: dict = {}
    exec("from bilae.analysis.functions import *", names)
    assert {"generalized_effective_dimension", "effective_dimension", "hoyer_density"} <= set(names)


def test_hoyer_density_sparsity_and_participation():
    one_hot, flat = torch.tensor([0.0, 3.0, 0.0, 0.0]), torch.full((4,), -2.0)
    assert functions.hoyer_density(torch.stack([one_hot, flat])).tolist() == [0.0, 1.0]
    assert functions.hoyer_sparsity(torch.stack([one_hot, flat])).tolist() == [1.0, 0.0]
    v = torch.randn(3, 9, dtype=torch.float64)
    expected = (v.abs().sum(-1) / v.norm(dim=-1) - 1) / (math.sqrt(9) - 1)
    assert torch.allclose(functions.hoyer_density(v), expected)
    assert torch.allclose(functions.hoyer_density(v.T, dim=0), expected)
    assert torch.allclose(functions.effective_dimension(v), v.abs().sum(-1) ** 2 / (v**2).sum(-1))
    ipr = (v**4).sum(-1) / (v**2).sum(-1) ** 2
    assert torch.allclose(functions.inverted_participation_ratio(v), ipr)
    assert functions.inverted_participation_ratio(torch.zeros(1, 4)).tolist() == [0.0]
    assert functions.hoyer_density(torch.zeros(2, 4)).tolist() == [0.0, 0.0]
