"""Model files: digests, schema checks and one error class for every kind of bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deeprfm import DeepRFM, ModelFileError, RFMClassifier, RFMRegressor
from deeprfm.data import load_dataset
from deeprfm.persist import save_state


@pytest.fixture(scope="module")
def digits():
    X, y = load_dataset("digits", split="train")
    return X[:200], y[:200]


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    """Paths of a saved RFMClassifier, RFMRegressor and DeepRFM, with the fitted models."""
    X, y = digits
    folder = tmp_path_factory.mktemp("models")
    models = {
        "classifier": RFMClassifier(iters=1).fit(X, y),
        "regressor": RFMRegressor(iters=1).fit(X, X[:, 10:12]),
        "deep": DeepRFM(layers=2, width=32, random_state=0).fit(X, y),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.pt"
        model.save(paths[name])
    return paths, models


LOADERS = {"classifier": RFMClassifier, "regressor": RFMRegressor, "deep": DeepRFM}


def rewrite(source, target, edit):
    """Load a model file's state, let ``edit(config, tensors)`` change it, save it anew.

    The new file has a valid manifest (digests of the edited tensors): what it tests is the
    schema check, not the digest.
    """
    state = torch.load(source, weights_only=True)
    config, tensors = json.loads(state["config"]), dict(state["tensors"])
    edit(config, tensors)
    save_state(target, config, tensors)
    return target


def test_models_round_trip_with_verified_digests(saved, digits):
    paths, models = saved
    X, _ = digits
    for name, path in paths.items():
        loaded = LOADERS[name].load(path)
        np.testing.assert_array_equal(loaded.predict(X), models[name].predict(X))
        manifest = json.loads(torch.load(path, weights_only=True)["manifest"])
        assert all(len(entry["sha256"]) == 64 for entry in manifest.values())


@pytest.mark.parametrize("name", list(LOADERS))
def test_flipped_bytes_in_the_tensor_data_are_refused(saved, tmp_path, name):
    paths, models = saved
    raw = bytearray(paths[name].read_bytes())
    tensor = models[name].X_fit_.detach().cpu().contiguous()
    start = bytes(raw).find(tensor.numpy().tobytes()[:64])
    assert start > 0, "the tensor's bytes should be stored as they are"
    raw[start + 100 : start + 108] = bytes(b ^ 0xFF for b in raw[start + 100 : start + 108])
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=r"damaged\.pt"):
        LOADERS[name].load(damaged)


def test_an_edited_tensor_no_longer_matches_its_digest(saved, tmp_path):
    paths, _ = saved
    state = torch.load(paths["classifier"], weights_only=True)
    state["tensors"]["alpha"][0, 0] += 1.0
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match="'alpha' does not match its recorded"):
        RFMClassifier.load(tmp_path / "edited.pt")


def _more_classes(config, tensors):
    config["targets"]["classes"].append(99)


def _nan_metric(config, tensors):
    tensors["M"] = torch.full_like(tensors["M"], float("nan"))


def _integer_centres(config, tensors):
    tensors["X_fit"] = tensors["X_fit"].to(torch.int64)


def _unknown_map(config, tensors):
    config["feature_maps"][0]["name"] = "tanh"


def _deep_more_classes(config, tensors):
    config["classes"].append(99)


def _wrong_kind(config, tensors):
    config["kind"] = "RFMRegressor"


def _missing_entry(config, tensors):
    del config["best_iter"]


def _unknown_parameter(config, tensors):
    config["params"]["bandwidth"] = -1.0


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("classifier", _more_classes, r"'alpha' has shape \(200, 10\).*'c' must be 11"),
        ("classifier", _nan_metric, "'M' holds NaN"),
        ("classifier", _integer_centres, "'X_fit' is missing or not floating point"),
        ("classifier", _wrong_kind, "holds a RFMRegressor, not a RFMClassifier"),
        ("classifier", _missing_entry, "missing entry 'best_iter'"),
        ("classifier", _unknown_parameter, "bandwidth"),
        ("deep", _unknown_map, "unknown feature map"),
        ("deep", _deep_more_classes, "'c' must be 11"),
    ],
)
def test_edited_configurations_are_refused(saved, tmp_path, name, edit, match):
    paths, _ = saved
    path = rewrite(paths[name], tmp_path / "edited.pt", edit)
    with pytest.raises(ModelFileError, match=match):
        LOADERS[name].load(path)


def test_empty_truncated_and_directory_files_are_refused(saved, tmp_path):
    paths, _ = saved
    empty, truncated = tmp_path / "empty.pt", tmp_path / "truncated.pt"
    empty.write_bytes(b"")
    truncated.write_bytes(paths["classifier"].read_bytes()[:500])
    for path in (empty, truncated, tmp_path):
        with pytest.raises(ModelFileError, match=str(path.name)):
            RFMClassifier.load(path)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        RFMClassifier.load(tmp_path / "absent.pt")


def test_files_of_the_first_format_load_with_a_warning(saved, tmp_path, digits):
    paths, models = saved
    state = torch.load(paths["classifier"], weights_only=True)
    del state["manifest"]
    state["format"] = "deeprfm-1"
    torch.save(state, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="cannot be verified"):
        loaded = RFMClassifier.load(tmp_path / "old.pt")
    np.testing.assert_array_equal(
        loaded.predict(digits[0]), models["classifier"].predict(digits[0])
    )
