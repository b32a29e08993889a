"""Checkpoints as the reference implementation (tdooms/bae) writes them, and its loader's call shapes.

The reference saves with ``safetensors.torch.save_model(coder, f"{folder}/model.safetensors")`` into
``{root}/{model}/{name}`` and ``json.dump(vars(coder.config), ...)`` (its ``autoencoders/base.py``):
config.json holds ``layer, d_model, expansion, bottleneck, alpha, beta, kind, tags`` and ``kwargs``. Its v0
kinds hold ``left``/``right``/``down`` parameters; its v1 vanilla (``autoencoders/v1/vanilla.py``) holds
``left``/``right`` as ``nn.Linear`` layers, hence ``left.weight``, ``left.bias``, ``right.weight``,
``right.bias``, with latents (l·x̂ + a)(r·x̂ + c). The modules below only reproduce those tensor layouts, so
the files are written by the same safetensors call.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from bilae import Autoencoder, CheckpointError, UsageError
from bilae.autoencoders import hub
from bilae.hooks import Harvester
from tests.support import oracle

D, EXPANSION = 8, 2
M = D * EXPANSION


class V1Layout(nn.Module):
    """The reference v1 tensor layout: two biased linear maps x̂ → R^m."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(D, M), nn.Linear(D, M)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        xhat = x * x.square().sum(-1, keepdim=True).rsqrt()
        return self.left(xhat) * self.right(xhat)


class V0Layout(nn.Module):
    """The reference v0 tensor layout: plain left/right (and down) parameters."""

    def __init__(self, bottleneck: int | None, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.left = nn.Parameter(torch.randn(M, D, generator=gen))
        self.right = nn.Parameter(torch.randn(M, D, generator=gen))
        if bottleneck is not None:
            self.down = nn.Parameter(torch.randn(bottleneck * D, M, generator=gen))


def reference_config(kind: str, layer: int = 3, alpha: float = 0.2, **more) -> dict:
    """``vars(Config(...))`` of the reference: its keys in its order, including the ``kwargs`` catch-all."""
    config = {"layer": layer, "d_model": D, "expansion": EXPANSION, "bottleneck": None, "alpha": alpha}
    config |= {"beta": 0.0, "kind": kind, "tags": [], "kwargs": {}}
    return config | more


def write_reference(root: Path, model: str, module: nn.Module, config: dict) -> Path:
    """Write ``<root>/<model>/<name>/`` exactly as the reference's ``save`` does (names lower-cased)."""
    tags = config["tags"]
    name = "-".join(
        [
            config["kind"],
            f"l{config['layer']:02d}",
            f"x{config['expansion']}",
            f"a{int(config['alpha'] * 100)}",
        ]
        + [f"b{int(config['beta'] * 100)}", *tags]
    )
    folder = root / model.lower().split("/")[-1] / name
    folder.mkdir(parents=True)
    save_model(module, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tokens(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2.0


# ------------------------------------------------------------------------------------------ v1 (affine)
def test_v1_checkpoint_loads_as_affine_with_lifted_latents(tmp_path: Path) -> None:
    v1 = V1Layout(seed=0)
    folder = write_reference(tmp_path, "Qwen/Qwen3-0.6B-Base", v1, reference_config("vanilla", bottleneck=2))
    assert set(load_file(folder / "model.safetensors")) == {
        "left.weight",
        "left.bias",
        "right.weight",
        "right.bias",
    }
    coder = Autoencoder.load(folder)
    assert coder.kind == "vanilla" and coder.config.affine
    assert coder.config.name == "vanilla-l03-x2-a20-b0-affine"
    assert coder.config.bottleneck is None and coder.config.extra["ignored_bottleneck"] == 2
    assert coder.config.extra["kwargs"] == {}
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(coder.features(x), v1.latents(x), rtol=1e-6, atol=1e-6)
        # (l'·z)(r'·z) with z = [1, x̂], l' = [a, l], r' = [c, r], from the v1 tensors themselves.
        z = oracle.lift(oracle.normalize(x))
        left = torch.cat([v1.left.bias[:, None], v1.left.weight], 1)
        right = torch.cat([v1.right.bias[:, None], v1.right.weight], 1)
        torch.testing.assert_close(coder.features(x), (z @ left.T) * (z @ right.T), rtol=1e-6, atol=1e-6)


def test_v1_loss_is_the_lifted_brute_force(tmp_path: Path) -> None:
    folder = write_reference(tmp_path, "qwen3-0.6b-base", V1Layout(seed=1), reference_config("vanilla"))
    coder = Autoencoder.load(folder, dtype=torch.float64)
    x = tokens(seed=1).double()
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[:3] = False
    loss, metrics = coder.loss(x, mask)
    want_loss, want_mse, _ = oracle.affine_loss(coder, x, mask)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["mse"], want_mse, rtol=1e-9, atol=0)


def test_v1_resaves_in_bilae_layout_and_round_trips(tmp_path: Path) -> None:
    folder = write_reference(tmp_path, "m", V1Layout(seed=2), reference_config("vanilla", bottleneck=2))
    coder = Autoencoder.load(folder)
    again = Autoencoder.load(coder.save(tmp_path / "again"))
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == {
        "left",
        "right",
        "left_bias",
        "right_bias",
    }
    assert again.config == coder.config and again.config.extra["ignored_bottleneck"] == 2
    x = tokens(seed=2)
    assert torch.equal(again.features(x), coder.features(x))


# ------------------------------------------------------------------------------------------ v0
@pytest.mark.parametrize(
    ("kind", "bottleneck", "stored"),
    [("vanilla", 2, None), ("ordered", 2, None), ("mixed", 2, 2), ("combined", None, 2), ("mixed", 4, 4)],
)
def test_v0_checkpoints_load(tmp_path: Path, kind: str, bottleneck: int | None, stored: int | None) -> None:
    """The sweep's bottleneck on every kind is ignored where there is none; a missing one means 2."""
    module = V0Layout(stored, seed=3)
    folder = write_reference(tmp_path, "m", module, reference_config(kind, bottleneck=bottleneck))
    coder = Autoencoder.load(folder)
    assert coder.kind == kind and not coder.config.affine
    if stored is None:
        assert coder.down is None and coder.config.extra.get("ignored_bottleneck") == bottleneck
    else:
        assert torch.equal(coder.down, module.down) and "ignored_bottleneck" not in coder.config.extra
    xhat = oracle.normalize(tokens(seed=3))
    want = (xhat @ module.left.T) * (xhat @ module.right.T)
    torch.testing.assert_close(coder.features(tokens(seed=3)), want.detach())


# ------------------------------------------------------------------------------------------ loader calls
def test_keyword_load_finds_the_local_layout(tmp_path: Path) -> None:
    write_reference(
        tmp_path / "weights", "Qwen/Qwen3-0.6B-Base", V0Layout(2, seed=4), reference_config("mixed")
    )
    coder = Autoencoder.load(
        "Qwen/Qwen3-0.6B-Base", "mixed", layer=3, expansion=EXPANSION, alpha=0.2, root=tmp_path / "weights"
    )
    assert coder.config.name == "mixed-l03-x2-a20-b0" and coder.hooked is None
    # Positional like the reference's signature, kind defaulting to mixed like the seed notebook's call.
    same = Autoencoder.load("Qwen/Qwen3-0.6B-Base", "mixed", 3, EXPANSION, 0.2, root=tmp_path / "weights")
    assert torch.equal(same.left, coder.left)
    same = Autoencoder.load(
        "qwen3-0.6b-base", layer=3, expansion=EXPANSION, alpha=0.2, root=tmp_path / "weights"
    )
    assert torch.equal(same.left, coder.left)


def test_save_in_reference_layout_then_load_by_name(tmp_path: Path) -> None:
    coder = Autoencoder.from_config(
        "combined", d_model=D, layer=5, expansion=EXPANSION, alpha=0.5, tags=["2"]
    )
    folder = coder.save("Qwen/Qwen3-0.6B-Base", root=tmp_path / "weights")
    assert folder == tmp_path / "weights" / "qwen3-0.6b-base" / "combined-l05-x2-a50-b0-2"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Autoencoder.load(
        "Qwen/Qwen3-0.6B-Base",
        "combined",
        layer=5,
        expansion=2,
        alpha=0.5,
        tags=["2"],
        root=tmp_path / "weights",
    )
    assert loaded.config == coder.config
    # A plain directory is still a directory.
    assert coder.save(tmp_path / "plain") == tmp_path / "plain"
    assert Autoencoder.load(tmp_path / "plain").config == coder.config


def test_affine_name_round_trips_through_the_layout(tmp_path: Path) -> None:
    coder = Autoencoder.from_config("ordered", d_model=D, layer=1, expansion=EXPANSION, affine=True)
    coder.save("some/model", root=tmp_path)
    loaded = Autoencoder.load("some/model", "ordered", layer=1, expansion=2, affine=True, root=tmp_path)
    assert loaded.config.affine and loaded.config.name == "ordered-l01-x2-a0-b0-affine"


def test_model_object_gives_a_hooked_coder(tmp_path: Path, qwen3_tiny) -> None:
    model, tokenizer = qwen3_tiny
    d = model.config.hidden_size
    coder = Autoencoder.from_config("mixed", d_model=d, layer=2, expansion=1, alpha=0.2)
    coder.save(model, root=tmp_path, model_name="qwen3-tiny")  # its name_or_path is empty
    loaded = Autoencoder.load(model, layer=2, expansion=1, alpha=0.2, root=tmp_path, model_name="qwen3-tiny")
    assert (
        isinstance(loaded.hooked, Harvester) and loaded.hooked.layer == 2 and loaded.hooked.tokenizer is None
    )
    batch = tokenizer(["a short text", "another, longer piece of text"], return_tensors="pt", padding=True)
    acts, mask = loaded.half().hooked(batch["input_ids"], batch["attention_mask"])  # .half() keeps it
    want, want_mask = Harvester(model, tokenizer, 2)(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(acts, want) and acts.shape[-1] == d
    assert torch.equal(
        mask, batch["attention_mask"].bool()
    )  # no tokenizer: pad masked (no special ids known)
    assert want_mask.sum() < mask.sum()  # with the tokenizer its special tokens are masked too
    with_tokenizer = Autoencoder.load(
        model, layer=2, expansion=1, alpha=0.2, root=tmp_path, model_name="qwen3-tiny", tokenizer=tokenizer
    )
    assert torch.equal(with_tokenizer.hooked(batch["input_ids"], batch["attention_mask"])[1], want_mask)
    assert copy.deepcopy(loaded).hooked is None  # copies never drag the LM along


def test_the_seed_notebooks_call_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Autoencoder.load(model, layer=18, expansion=16, alpha=0.2).half()`` with ``weights/`` in the cwd."""
    from bilae.lm import load_lm

    model, _ = load_lm("qwen3-tiny")  # a fresh one: its name is changed below
    model.name_or_path = "Qwen/Qwen3-0.6B-Base"  # as from_pretrained sets it
    monkeypatch.chdir(tmp_path)
    coder = Autoencoder.from_config(
        "mixed", d_model=model.config.hidden_size, layer=2, expansion=1, alpha=0.2
    )
    assert coder.save(model) == Path("weights/qwen3-0.6b-base/mixed-l02-x1-a20-b0")
    loaded = Autoencoder.load(model, layer=2, expansion=1, alpha=0.2).half()
    assert loaded.hooked is not None and loaded.hooked.model is model and loaded.left.dtype == torch.float16
    assert torch.equal(loaded.left, coder.left.half())


def test_harvester_without_tokenizer_masks_the_config_special_ids(minilm) -> None:
    model, tokenizer = minilm
    harvester = Harvester(model, None, 1)
    assert harvester.special_ids.tolist() == [model.config.pad_token_id]
    batch = tokenizer(["a short text", "another, longer piece"], return_tensors="pt", padding=True)
    _, mask = harvester(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(mask, batch["attention_mask"].bool())  # [CLS]/[SEP] are only the tokenizer's


def test_hooked_coder_runs_the_notebook_manifold(tmp_path: Path, qwen3_tiny) -> None:
    from bilae.analysis.notebook import Manifold

    model, tokenizer = qwen3_tiny
    Autoencoder.from_config("mixed", d_model=64, layer=1, expansion=1).save(
        model, root=tmp_path, model_name="tiny"
    )
    coder = Autoencoder.load(model, layer=1, expansion=1, root=tmp_path, model_name="tiny").half()
    texts = ["the cat sat on the mat", "one two three four five six", "a b c d e f g"]
    dataset = [dict(tokenizer(texts, return_tensors="pt", padding=True))] * 2
    density = coder.left[:4].float().T @ coder.right[:4].float()
    manifold = Manifold(dataset, coder.hooked, tokenizer, density, max_steps=2**5)
    assert manifold.spectrum() is not None


def test_name_of_a_model_object_follows_name_or_path(minilm) -> None:
    model, _ = minilm
    assert hub.model_part(model) == model.name_or_path.rstrip("/").lower().split("/")[-1]
    assert hub.model_part("Qwen/Qwen3-0.6B-Base") == "qwen3-0.6b-base"
    assert hub.model_part(model, "all-MiniLM-L6-v2") == "all-minilm-l6-v2"
    assert hub.scope_repo("qwen3-0.6b-base") == "tdooms/qwen3-0.6b-base-scope"


# ------------------------------------------------------------------------------------------ push to hub
class FakeUpload:
    """Records ``HfApi.upload_folder`` calls and what the uploaded folder held at that moment."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, *, folder_path, path_in_repo, repo_id, **options):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(dict(path_in_repo=path_in_repo, repo_id=repo_id, files=files, **options))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_uploads_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    fake = FakeUpload()
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kwargs: fake(**kwargs))
    coder = Autoencoder.from_config("mixed", d_model=D, layer=18, expansion=EXPANSION, alpha=0.2, affine=True)
    result = coder.push_to_hub("me/qwen3-0.6b-base-scope", commit_message="add")
    assert result == "https://huggingface.co/me/qwen3-0.6b-base-scope/commit/0"
    (call,) = fake.calls
    assert (
        call["repo_id"] == "me/qwen3-0.6b-base-scope" and call["path_in_repo"] == "mixed-l18-x2-a20-b0-affine"
    )
    assert call["commit_message"] == "add" and set(call["files"]) == {"config.json", "model.safetensors"}
    (tmp_path / "got").mkdir()
    for name, data in call["files"].items():
        (tmp_path / "got" / name).write_bytes(data)
    assert Autoencoder.load(tmp_path / "got").config == coder.config
    # The reference's save(..., push_to_hub=True): <owner>/<model>-scope, path the name.
    coder.save("Qwen/Qwen3-0.6B-Base", root=tmp_path / "weights", push_to_hub=True, owner="me")
    assert fake.calls[1]["repo_id"] == "me/qwen3-0.6b-base-scope"
    assert (tmp_path / "weights" / "qwen3-0.6b-base" / coder.config.name / "config.json").is_file()


def test_push_to_hub_unreachable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.\nUnset it.")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    coder = Autoencoder.from_config("vanilla", d_model=D, layer=0, expansion=EXPANSION)
    with pytest.raises(
        CheckpointError, match=r"could not upload vanilla-l00-x2-a0-b0 to hub repo 'me/x'.*local"
    ) as err:
        coder.push_to_hub("me/x")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ bad input
def test_missing_local_weights_names_the_path_and_what_is_there(tmp_path: Path) -> None:
    write_reference(tmp_path, "Qwen/Qwen3-0.6B-Base", V0Layout(2, seed=5), reference_config("mixed"))
    message = (
        r"no local autoencoder at .*qwen3-0.6b-base/mixed-l18-x2-a20-b0; .*holds \['mixed-l03-x2-a20-b0'\]. "
        r"Pass hf=True .*tdooms/qwen3-0.6b-base-scope"
    )
    with pytest.raises(CheckpointError, match=message):
        Autoencoder.load("Qwen/Qwen3-0.6B-Base", layer=18, expansion=2, alpha=0.2, root=tmp_path)
    with pytest.raises(CheckpointError, match=r"other-model does not exist"):
        Autoencoder.load("other-model", layer=18, expansion=2, root=tmp_path)


def test_hub_unreachable_suggests_the_local_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (
        r"could not fetch mixed-l18-x16-a100-b0/config.json from hub repo 'tdooms/qwen3-0.6b-base-scope'.*"
        r"Offline, copy the folder to weights/qwen3-0.6b-base/mixed-l18-x16-a100-b0 and load with hf=False"
    )
    with pytest.raises(CheckpointError, match=message) as err:
        Autoencoder.load("Qwen/Qwen3-0.6B-Base", "mixed", layer=18, expansion=16, alpha=1.0, hf=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tags", [["../up"], ["a/b"], ["/abs"], ["a\\b"], [".."], ["~"], [""]])
def test_traversal_tags_are_refused(tmp_path: Path, tags: list[str]) -> None:
    with pytest.raises(UsageError, match=r"tag (.* cannot be part of a checkpoint path|must be a non-empty)"):
        Autoencoder.load("m", "mixed", layer=1, tags=tags, root=tmp_path)
    with pytest.raises(UsageError, match=r"tag "):
        Autoencoder.from_config("mixed", d_model=D, layer=1, tags=tags)


@pytest.mark.parametrize("model", ["org/..", ".", "~"])
def test_traversal_model_names_are_refused(tmp_path: Path, model: str) -> None:
    with pytest.raises(UsageError, match=r"model name .* cannot be part of a checkpoint path"):
        Autoencoder.load(model, layer=1, root=tmp_path)


def test_traversal_kind_and_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown autoencoder kind '\.\./mixed'"):
        Autoencoder.load("m", "../mixed", layer=1, root=tmp_path)
    with pytest.raises(UsageError, match=r"checkpoint name '\.\./x' cannot be part"):
        Autoencoder.from_pretrained(tmp_path, "../x")
    with pytest.raises(UsageError, match=r"model name '\.\.' cannot be part"):
        Autoencoder.from_config("vanilla", d_model=D, layer=0).save("..", root=tmp_path)
    folder = write_reference(tmp_path, "m", V0Layout(None, seed=6), reference_config("vanilla"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tags": ["../../etc"]}))
    with pytest.raises(UsageError, match=r"tag '\.\./\.\./etc' cannot be part of a checkpoint path"):
        Autoencoder.load(folder)


def test_bad_hub_repo_and_path_in_repo_are_refused() -> None:
    coder = Autoencoder.from_config("vanilla", d_model=D, layer=0, expansion=EXPANSION)
    with pytest.raises(CheckpointError, match=r"'no-owner' is neither a local directory nor a hub repo id"):
        coder.push_to_hub("no-owner")
    with pytest.raises(UsageError, match=r"path_in_repo '\.\./x' cannot be part"):
        coder.push_to_hub("me/x", path_in_repo="../x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer="18"), r"layer must be an integer, got '18'"),
        (dict(layer=18, expansion=1.5), r"expansion must be an integer, got 1.5"),
        (dict(layer=18, alpha="0.2"), r"alpha must be a finite number >= 0, got '0.2'"),
        (dict(layer=18, hf="yes"), r"hf must be True or False, got 'yes'"),
        (dict(layer=18, tags=5), r"tags must be a list of strings, got 5"),
        (dict(layer=18, kind="mixd"), r"unknown autoencoder kind 'mixd'.*'mixed'"),
        (dict(layer=18, kind=["mixed"]), r"unknown autoencoder kind \['mixed'\]"),
        (dict(layer=18, affine="no"), r"affine must be true or false"),
        (dict(kind="mixed"), r"needs layer=<int>"),
        (dict(hf=True), r"needs layer=<int>"),
    ],
)
def test_bad_keyword_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Autoencoder.load("Qwen/Qwen3-0.6B-Base", root=tmp_path, **kwargs)


def test_model_of_an_unknown_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot tell the model's name from int.*model_name="):
        Autoencoder.load(123, layer=1, root=tmp_path)


def test_model_object_needs_a_layer_and_a_name(tmp_path: Path, qwen3_tiny) -> None:
    model, _ = qwen3_tiny
    with pytest.raises(UsageError, match=r"needs layer=<int>.*got Qwen3ForCausalLM"):
        Autoencoder.load(model)
    with pytest.raises(UsageError, match=r"cannot tell the model's name from Qwen3ForCausalLM.*model_name="):
        Autoencoder.load(model, layer=1)
    with pytest.raises(UsageError, match=r"model_name="):
        Autoencoder.from_config("vanilla", d_model=64, layer=0).save(model, root=tmp_path)


def test_model_of_another_width_is_refused(tmp_path: Path, qwen3_tiny) -> None:
    model, _ = qwen3_tiny
    Autoencoder.from_config("vanilla", d_model=D, layer=1, expansion=2).save("tiny", root=tmp_path)
    with pytest.raises(CheckpointError, match=r"d_model 8, but model .* has d_model 64"):
        Autoencoder.load(model, "vanilla", layer=1, expansion=2, root=tmp_path, model_name="tiny")


def test_v1_tensors_with_a_missing_bias(tmp_path: Path) -> None:
    module = V1Layout(seed=7)
    module.right = nn.Linear(D, M, bias=False)
    folder = write_reference(tmp_path, "m", module, reference_config("vanilla"))
    with pytest.raises(
        CheckpointError, match=r"holds tensors .*needs \['left', 'left_bias', 'right', 'right_bias'\]"
    ):
        Autoencoder.load(folder)


def test_v1_tensors_on_topk_are_refused(tmp_path: Path) -> None:
    folder = write_reference(tmp_path, "m", V1Layout(seed=8), reference_config("topk"))
    with pytest.raises(UsageError, match=r"topk autoencoder has no affine variant"):
        Autoencoder.load(folder)
