"""Deep RFM: learning and collapse on digits, transform/predict consistency, persistence."""

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.base import clone

from deeprfm import DeepRFM
from deeprfm.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    X_train, y_train = load_dataset("digits", split="train")
    X_test, y_test = load_dataset("digits", split="test")
    return X_train, X_test, y_train, y_test


@pytest.fixture(scope="module")
def deep(digits):
    X_train, X_test, y_train, y_test = digits
    return DeepRFM(layers=5, random_state=0).fit(X_train, y_train, eval_set=(X_test, y_test))


def test_accuracy_and_collapse_on_digits(deep, digits):
    _, X_test, _, y_test = digits
    assert deep.score(X_test, y_test) >= 0.95
    nc1 = deep.collapse_["nc1_trace"].sel(stage="input").values
    print("nc1_trace entering each layer:", np.round(nc1, 4))
    assert nc1[-1] <= nc1[0] / 10  # deep neural collapse


def test_collapse_dataset_layout(deep):
    collapse = deep.collapse_
    assert collapse["nc1"].dims == ("layer", "stage")
    assert list(collapse.stage.values) == ["input", "projected", "features"]
    assert list(collapse.layer.values) == list(range(5))
    for name in ("nc1", "nc2", "eval_nc1", "train_acc", "eval_acc", "rfm_seconds"):
        assert name in collapse and collapse[name].attrs["long_name"]
    # the features leaving layer l are those entering layer l + 1
    np.testing.assert_allclose(
        collapse["nc1_trace"].sel(stage="features").values[:-1],
        collapse["nc1_trace"].sel(stage="input").values[1:],
        rtol=1e-4,
    )


def test_collapse_dataset_round_trips_through_netcdf(deep, tmp_path):
    path = tmp_path / "collapse.nc"
    deep.collapse_.to_netcdf(path)
    with xr.open_dataset(path) as loaded:
        xr.testing.assert_allclose(loaded, deep.collapse_)
        assert loaded.attrs["params"] == deep.collapse_.attrs["params"]


def test_transform_reproduces_training_features(digits):
    X_train, _, y_train, _ = digits
    X, y = X_train[:300], y_train[:300]
    model = DeepRFM(layers=3, width=128, random_state=1, dtype=torch.float64).fit(X, y)
    features = model.transform(X, layer=0, stage="input")
    np.testing.assert_allclose(features, model.X_fit_.numpy())
    for layer in range(3):
        entering = model.transform(X, layer=layer)
        projected = model.transform(X, layer=layer, stage="projected")
        np.testing.assert_allclose(projected, entering @ model.layers_[layer].M_sqrt.numpy())
        if layer < 2:
            np.testing.assert_allclose(
                model.transform(X, layer=layer, stage="features"),
                model.transform(X, layer=layer + 1),
            )
    # the last layer's RFM reproduces its training fit on the training data
    last = model.layers_[-1]
    assert last.history["train_acc"].values[-1] == (model.predict(X) == y).mean()


def test_predict_layers_and_determinism(digits):
    X_train, X_test, y_train, _ = digits
    a = DeepRFM(layers=2, width=64, random_state=3).fit(X_train[:400], y_train[:400])
    b = DeepRFM(layers=2, width=64, random_state=3).fit(X_train[:400], y_train[:400])
    c = DeepRFM(layers=2, width=64, random_state=4).fit(X_train[:400], y_train[:400])
    per_layer = a.predict_layers(X_test)
    assert per_layer.shape == (2, len(X_test))
    np.testing.assert_array_equal(per_layer[-1], a.predict(X_test))
    np.testing.assert_array_equal(a.decision_function(X_test), b.decision_function(X_test))
    assert not np.array_equal(a.transform(X_test, layer=1), c.transform(X_test, layer=1))


def test_laplace_random_fourier_features(digits):
    X_train, X_test, y_train, y_test = digits
    model = DeepRFM(layers=2, width=512, feature_map="laplace_rff", random_state=0)
    model.fit(X_train, y_train)
    assert model.score(X_test, y_test) > 0.9


def test_save_and_load_give_identical_predictions(digits, tmp_path):
    X_train, X_test, y_train, _ = digits
    names = np.array([f"digit {i}" for i in range(10)])
    model = DeepRFM(layers=2, width=64, random_state=0, diag=True).fit(
        X_train[:300], names[y_train[:300]]
    )
    path = tmp_path / "deep.pt"
    model.save(path)
    loaded = DeepRFM.load(path)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.decision_function(X_test), model.decision_function(X_test))
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))
    xr.testing.assert_identical(loaded.collapse_, model.collapse_)


def test_params_pass_through_and_clone():
    model = DeepRFM(layers=2, agop_power=0.5, centering=True)
    params = model.get_params()
    assert params["agop_power"] == 0.5 and params["centering"] is True
    assert clone(model).get_params() == params
    assert model.set_params(diag=True).diag is True
    with pytest.raises(TypeError, match="unexpected keyword"):
        DeepRFM(iters=3)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"layers": 0}, ValueError, "layers"),
        ({"width": 0}, ValueError, "width"),
        ({"layers": 2.5}, TypeError, "layers"),
        ({"feature_map": "tanh"}, ValueError, "feature_map"),
        ({"bandwidth": -1.0}, ValueError, "bandwidth"),
        ({"reg": -1.0}, ValueError, "reg"),
        ({"exponent": 0.0}, ValueError, "exponent"),
        ({"rfm_iters": -1}, ValueError, "rfm_iters"),
    ],
)
def test_bad_parameters(digits, params, error, match):
    X_train, _, y_train, _ = digits
    with pytest.raises(error, match=match):
        DeepRFM(**params).fit(X_train[:50], y_train[:50])


def test_bad_data(digits):
    X_train, X_test, y_train, _ = digits
    X, y = X_train[:100].copy(), y_train[:100]
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DeepRFM(layers=1).fit(bad, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        DeepRFM(layers=1).fit(X, np.ones(len(X)))
    with pytest.raises(ValueError, match="inconsistent"):
        DeepRFM(layers=1).fit(X, y[:-1])
    model = DeepRFM(layers=1, width=16).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X_test[:, :5])
    with pytest.raises(ValueError, match="layer"):
        model.transform(X, layer=3)
    with pytest.raises(ValueError, match="stage"):
        model.transform(X, stage="output")
    X_copy = X.copy()
    model.transform(X)
    np.testing.assert_array_equal(X, X_copy)
