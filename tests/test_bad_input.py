"""No silent wrong answers: every public entry point refuses bad input with an error naming it.

``BAD_CALLS`` is the table every new public entry point joins: a call that must raise, the
exception type and a pattern of its message (which names the argument). The tests below it
cover what a table row cannot: aliasing, warnings, memory refusals in a subprocess with a
lowered address-space limit, files, and threads.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest
import torch

import analysis
from deeprfm import AGOPFeatureSelector, DeepRFM, HyperBFClassifier, RFMClassifier, RFMRegressor
from deeprfm.data import load_dataset, modular_arithmetic
from deeprfm.kernels import LaplaceKernel, sq_distances
from deeprfm.probes import NeuralProbe
from deeprfm.solvers import DirectSolver, EigenProSolver, make_solver

X_DIGITS, Y_DIGITS = load_dataset("digits", split="train")
X, Y = X_DIGITS[:300], Y_DIGITS[:300]
X_TEST = load_dataset("digits", split="test")[0][:100]


def _fitted() -> RFMClassifier:
    return RFMClassifier(iters=0).fit(X, Y)


def _nan_rows() -> np.ndarray:
    bad = X.copy()
    bad[3, 7] = np.nan
    return bad


BAD_CALLS = {
    "predict on inputs that overflow float32": (
        lambda: _fitted().predict(X_TEST * 1e30),
        ValueError,
        "X: the squared Mahalanobis distances overflow float32",
    ),
    "fit on inputs that overflow float32 (direct)": (
        lambda: RFMClassifier(iters=1, solver="direct").fit(X * 1e30, Y),
        ValueError,
        "overflow float32",
    ),
    "fit on inputs that overflow float32 (EigenPro)": (
        lambda: RFMClassifier(iters=1, solver="eigenpro").fit(X * 1e30, Y),
        ValueError,
        "overflow float32",
    ),
    "squared distances that overflow float32": (
        lambda: sq_distances(torch.full((3, 4), 1e30), torch.zeros(2, 4)),
        ValueError,
        "overflow float32",
    ),
    "fit with NaN inputs": (lambda: RFMRegressor().fit(_nan_rows(), Y), ValueError, "NaN"),
    "M_init that is not PSD": (
        lambda: RFMClassifier(iters=1).fit(X, Y, M_init=-np.eye(64)),
        ValueError,
        "M_init must be positive semi-definite",
    ),
    "M_init that is not symmetric": (
        lambda: RFMClassifier(iters=1).fit(X, Y, M_init=np.triu(np.ones((64, 64)))),
        ValueError,
        "M_init must be symmetric",
    ),
    "M_init with NaN": (
        lambda: RFMClassifier(iters=1).fit(X, Y, M_init=np.full((64, 64), np.nan)),
        ValueError,
        "M_init",
    ),
    "a memory budget too small to solve": (
        lambda: RFMClassifier(iters=1, memory_gb=1e-6).fit(X, Y),
        ValueError,
        "memory_gb: a budget of .* is too small for EigenPro",
    ),
    "a memory budget too small for a Deep RFM": (
        lambda: DeepRFM(layers=1, width=16, memory_gb=1e-6).fit(X, Y),
        ValueError,
        "memory_gb",
    ),
    "agop_power whose AGOP^p overflows": (
        lambda: RFMRegressor(iters=1, agop_power=20.0).fit(X, 1e3 * X[:, 20]),
        ValueError,
        "agop_power=20: AGOP\\^20 is not finite",
    ),
    "make_solver with n < 1": (lambda: make_solver("auto", -5), ValueError, "n must be >= 1"),
    "feature selector with both threshold and k": (
        lambda: AGOPFeatureSelector(threshold=0.1, k=5).fit(X, Y),
        ValueError,
        "threshold and k are mutually exclusive",
    ),
    "feature selector with a metric of the wrong shape": (
        lambda: AGOPFeatureSelector(M=np.eye(3)).fit(X),
        ValueError,
        "M must have shape \\(64, 64\\)",
    ),
    "modular division by a non-prime modulus": (
        lambda: modular_arithmetic(12, op="div"),
        ValueError,
        "p must be prime for op='div'",
    ),
    "EigenPro on empty X": (
        lambda: EigenProSolver().solve(LaplaceKernel(), torch.zeros(0, 3), torch.zeros(0, 1)),
        ValueError,
        "X must be a 2-D tensor .* n >= 1",
    ),
    "direct solve with a NaN ridge": (
        lambda: DirectSolver().solve(
            LaplaceKernel(), torch.ones(4, 2), torch.ones(4, 1), reg=float("nan")
        ),
        ValueError,
        "reg must be finite",
    ),
    "direct solve with numpy inputs": (
        lambda: DirectSolver().solve(LaplaceKernel(), np.ones((4, 2)), torch.ones(4, 1)),
        TypeError,
        "X must be a torch.Tensor",
    ),
    "HyperBF with an unknown metric update": (
        lambda: HyperBFClassifier(metric_update="newton").fit(X, Y),
        ValueError,
        "metric_update must be one of \\('gd', 'agop'\\)",
    ),
    "HyperBF fit on inputs that overflow float32": (
        lambda: HyperBFClassifier(epochs=1, n_centres=20).fit(X * 1e30, Y),
        ValueError,
        "overflow float32",
    ),
    "probe pair of different lengths": (
        lambda: NeuralProbe(torch.nn.Linear(64, 10)).measure(
            (torch.as_tensor(X[:120]), torch.as_tensor(Y[:100]))
        ),
        ValueError,
        "the pair \\(X, y\\) has 120 inputs but 100 labels",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises_a_clear_error(case):
    call, error, match = BAD_CALLS[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("estimator", [RFMClassifier(iters=1), RFMRegressor(iters=1)], ids=repr)
def test_fitted_models_do_not_alias_the_callers_arrays(estimator):
    X_own = X.astype(np.float32)  # the dtype the model computes in: sharing would be possible
    target = Y if isinstance(estimator, RFMClassifier) else X_own[:, 20].copy()
    M_init = np.eye(64, dtype=np.float32)
    model = estimator.fit(X_own, target, M_init=M_init)
    before = model.predict(X_TEST)
    outputs = model._outputs(X_TEST).clone()
    X_own *= 3.0
    M_init *= 5.0
    np.testing.assert_array_equal(model.predict(X_TEST), before)
    torch.testing.assert_close(model._outputs(X_TEST), outputs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("params", "cause"),
    [
        ({"bandwidth": 1e-30}, "bandwidth=1e-30 is tiny"),
        ({"bandwidth": 1e30}, "bandwidth=1e\\+30 is huge"),
        ({"reg": 1e30}, "reg=1e\\+30 is so large"),
        ({"agop_power": 1e6}, "agop_power=1e\\+06 makes every eigenvalue"),
    ],
)
def test_a_constant_predictor_is_named_with_its_likely_cause(params, cause):
    with pytest.warns(RuntimeWarning, match=f"the fitted predictor is constant.*{cause}") as got:
        RFMClassifier(iters=1, **params).fit(X, Y)
    assert got[0].filename == __file__  # the warning points at the user's call


def test_deep_rfm_normalises_huge_rows_without_overflow():
    small = DeepRFM(layers=2, width=64, random_state=0).fit(X, Y)
    huge = DeepRFM(layers=2, width=64, random_state=0).fit(X * np.float32(1e20), Y)
    assert huge.score(X_TEST * np.float32(1e20), small.predict(X_TEST)) >= 0.99


@pytest.mark.parametrize("features", [np.ones((20, 3)), np.zeros((20, 3))], ids=["ones", "zeros"])
def test_degenerate_collapse_metrics_warn_once_naming_them(features):
    with pytest.warns(RuntimeWarning, match=r"\['nc1', 'nc1_trace', 'cdnv'.*Sigma_B = 0") as got:
        result = analysis.collapse_metrics(features, np.arange(20) % 2)
    assert len(got) == 1 and np.isnan(float(result["nc1"]))


def test_probe_on_a_constant_input_warns():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    data = (torch.ones(12, 4), torch.arange(12) % 2)
    with pytest.warns(RuntimeWarning, match="Sigma_B = 0"):
        NeuralProbe(model, agop=False, nfm=False).measure(data)


MEMORY_CASES = {
    "direct solve at n = 200 000": (
        "RFMRegressor(iters=0, solver='direct').fit(rng.standard_normal((200_000, 4), "
        "dtype=np.float32), np.zeros(200_000))",
        "solver='direct' at n=200000",
    ),
    "RFM at d = 30 000": (
        "RFMRegressor(iters=1).fit(rng.standard_normal((50, 30_000), dtype=np.float32), "
        "np.zeros(50))",
        "an RFM on d=30000 features",
    ),
    "DeepRFM(width=10**7)": (
        "DeepRFM(layers=2, width=10**7, memory_gb=1.0).fit(rng.standard_normal((100, 8)), "
        "np.arange(100) % 2)",
        "DeepRFM\\(width=10000000\\)",
    ),
    "DeepRFM(width=10**8)": (
        "DeepRFM(layers=1, width=10**8, memory_gb=1.0).fit(rng.standard_normal((100, 8)), "
        "np.arange(100) % 2)",
        "DeepRFM\\(width=100000000\\)",
    ),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_requests_that_cannot_fit_are_refused_before_allocating(case):
    call, match = MEMORY_CASES[case]
    script = textwrap.dedent(
        f"""
        import resource, numpy as np
        from deeprfm import DeepRFM, RFMRegressor
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 3 * 1024**3, resource.RLIM_INFINITY))
        rng = np.random.default_rng(0)
        try:
            {call}
        except MemoryError as err:
            print("refused:", err)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout, result.stdout
    assert __import__("re").search(match, result.stdout)
    assert "GiB" in result.stdout and "memory budget" in result.stdout


def _write_idx(path, shape, data: bytes, compress: bool) -> None:
    header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as file:
        file.write(header + data)


def test_an_mnist_gz_announcing_few_images_is_not_inflated_whole(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    # 3 images announced, 200 MB of zeros behind them: a small file that inflates hugely
    _write_idx(folder / "train-images-idx3-ubyte.gz", (3, 28, 28), bytes(200 * 1024**2), True)
    _write_idx(folder / "train-labels-idx1-ubyte", (3,), bytes(3), False)
    assert (folder / "train-images-idx3-ubyte.gz").stat().st_size < 1024**2
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"announces shape \(3, 28, 28\).*more than 2352"):
        load_dataset("mnist", root=tmp_path, split="train")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 1024**2


def test_a_split_without_images_is_reported(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    _write_idx(folder / "t10k-images-idx3-ubyte", (0, 28, 28), b"", False)
    _write_idx(folder / "t10k-labels-idx1-ubyte", (0,), b"", False)
    with pytest.raises(ValueError, match="hold no images"):
        load_dataset("mnist", root=tmp_path, split="test")


def _in_threads(functions):
    results, errors = [None] * len(functions), []

    def run(i):
        try:
            results[i] = functions[i]()
        except Exception as err:  # reported below, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


def test_threads_fitting_and_predicting_give_the_sequential_results():
    def fit(seed):
        return lambda: RFMClassifier(iters=1, random_state=seed).fit(X, Y).predict(X_TEST)

    sequential = [fit(0)(), fit(1)()]
    for got, expected in zip(_in_threads([fit(0), fit(1)]), sequential, strict=True):
        np.testing.assert_array_equal(got, expected)
    model = _fitted()
    expected = model.decision_function(X_TEST)
    for got in _in_threads([lambda: model.decision_function(X_TEST)] * 4):
        np.testing.assert_array_equal(got, expected)


def test_two_probes_measure_one_model_from_two_threads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model.train()
    data = (torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y))
    expected = NeuralProbe(model).measure(data)
    trees = _in_threads([lambda: NeuralProbe(model).measure(data)] * 2)
    for tree in trees:
        np.testing.assert_allclose(tree.ds.nc1, expected.ds.nc1, rtol=1e-6)
        np.testing.assert_allclose(tree.ds.nfa_corr, expected.ds.nfa_corr, rtol=1e-6)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_warnings_from_deep_inside_the_library_point_at_the_users_line():
    model = torch.nn.Sequential(torch.nn.Linear(40, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    probe = NeuralProbe(model, collapse=False)
    probe.memory_gb = 6 * 8 * 20**2 / 1024**3  # the 40-wide first layer in diagonal form
    with pytest.warns(RuntimeWarning, match="only the diagonals") as got:
        probe.measure([torch.randn(8, 40)])
    assert got[0].filename == __file__
    with pytest.warns(RuntimeWarning, match="Sigma_B = 0|the training points coincide") as got:
        DeepRFM(layers=1, width=8).fit(np.ones((20, 4)), np.arange(20) % 2)
    assert len(got) >= 2 and all(record.filename == __file__ for record in got)
