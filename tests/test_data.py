"""Tests for deeprfm.data: tiny files in each real on-disk format, written here and read back."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from deeprfm.data import DATASETS, _balanced_subset, default_root, load_dataset

N_IMAGES = 20


# ----------------------------------------------------------------------------------------------
# Writers for the real formats
# ----------------------------------------------------------------------------------------------


def _images(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, width), dtype=np.uint8)


def _labels(rng: np.random.Generator, count: int = N_IMAGES) -> list[int]:
    return rng.permutation(np.arange(count) % 10).tolist()


def _py2_str(value: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<i", len(value)) + value


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _py2_uint8_array(array: np.ndarray) -> bytes:
    """A uint8 ndarray pickled as numpy 1.x under Python 2 did (the real CIFAR-10 files)."""
    shape = b"(" + b"".join(_py2_int(s) for s in array.shape) + b"t"
    dtype_args = _py2_str(b"u1") + _py2_int(0) + _py2_int(1)
    dtype_state = _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0)
    dtype = b"cnumpy\ndtype\n" + dtype_args + b"\x87R(" + dtype_state + b"tb"
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R("
        + _py2_int(1)
        + shape
        + dtype
        + b"\x89"
        + _py2_str(array.tobytes())
        + b"tb"
    )


def _py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch byte for byte in the layout of the real (Python 2) files."""
    label_list = b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
    names = b"](" + b"".join(_py2_str(f"img_{i}.png".encode()) for i in range(len(labels))) + b"e"
    return (
        b"\x80\x02}("
        + _py2_str(b"data")
        + _py2_uint8_array(data)
        + _py2_str(b"labels")
        + label_list
        + _py2_str(b"batch_label")
        + _py2_str(b"training batch 1 of 5")
        + _py2_str(b"filenames")
        + names
        + b"u."
    )


def _write_cifar(
    root: Path, rng: np.random.Generator, style: str = "py2"
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write all six batches (20 images each) in ``style``; return {file: (data, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _images(rng, N_IMAGES, 3072), _labels(rng)
        if style == "py2":
            (folder / file).write_bytes(_py2_cifar_batch(data, labels))
        else:  # a Python 3 dict like torchvision's, data as an array or as raw bytes
            entry = {
                b"batch_label": file.encode(),
                b"labels": labels,
                b"data": data if style == "numpy" else data.tobytes(),
                b"filenames": [f"{i}.png".encode() for i in range(N_IMAGES)],
            }
            with open(folder / file, "wb") as handle:
                pickle.dump(entry, handle, protocol=4)
        written[file] = (data, labels)
    return written


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _write_mnist(
    root: Path, rng: np.random.Generator, gz: bool, labels: list[int] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    written = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        y = np.array(_labels(rng) if labels is None else labels, dtype=np.uint8)
        images = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, gz)
        written[split] = (images, y)
    return written


def _write_svhn(root: Path, rng: np.random.Generator, split: str = "train") -> tuple:
    """SVHN's .mat layout: X (32, 32, 3, N) uint8, y (N, 1) uint8 in 1..10 (10 is digit 0)."""
    X = rng.integers(0, 256, size=(32, 32, 3, N_IMAGES), dtype=np.uint8)
    y = (np.arange(N_IMAGES, dtype=np.uint8) % 10 + 1)[:, None]
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
    return X, y


# ----------------------------------------------------------------------------------------------
# Registry and default folder
# ----------------------------------------------------------------------------------------------


def test_registry_lists_the_supported_datasets():
    assert DATASETS == ("digits", "cifar10", "mnist", "svhn")


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPRFM_DATA", str(tmp_path / "somewhere"))
    assert default_root() == tmp_path / "somewhere"
    monkeypatch.delenv("DEEPRFM_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".cache" / "deeprfm" / "data"
    monkeypatch.setenv("DEEPRFM_DATA", "")
    assert default_root() == tmp_path / ".cache" / "deeprfm" / "data"


def test_load_dataset_reads_from_the_default_root(monkeypatch, tmp_path, rng):
    written = _write_mnist(tmp_path, rng, gz=False)
    monkeypatch.setenv("DEEPRFM_DATA", str(tmp_path))
    _, y = load_dataset("mnist", split="test")
    np.testing.assert_array_equal(y, written["test"][1])


def test_root_expands_the_home_folder(monkeypatch, tmp_path, rng):
    written = _write_mnist(tmp_path / "data", rng, gz=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _, y = load_dataset("mnist", root="~/data")
    np.testing.assert_array_equal(y, written["train"][1])


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def test_digits_split_shapes_types_and_values():
    X_train, y_train = load_dataset("digits")
    X_test, y_test = load_dataset("digits", split="test")
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int64
    assert X_train.min() == 0.0 and X_train.max() == 1.0
    images, _ = load_dataset("digits", split="test", flatten=False)
    assert images.shape == (450, 1, 8, 8)
    np.testing.assert_array_equal(images.reshape(450, 64), X_test)
    raw, _ = load_dataset("digits", split="test", unit_scale=False)
    np.testing.assert_array_equal(raw, X_test * 16)
    assert raw.max() == 16.0

    # The two splits partition the bundled data, stratified by class.
    digits = load_digits()
    both = np.concatenate([X_train * 16, X_test * 16]).astype(np.float64)
    rows = np.column_stack([both, np.concatenate([y_train, y_test])])
    full = np.column_stack([digits.data, digits.target])
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(full, axis=0))
    assert len(rows) == len(full)
    counts = np.bincount(digits.target)
    assert np.all(np.abs(np.bincount(y_test) - 0.25 * counts) <= 1)


def test_digits_split_is_deterministic_and_ignores_random_state():
    X1, y1 = load_dataset("digits", split="test", random_state=1)
    X2, y2 = load_dataset("digits", split="test", random_state=2)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)


# ----------------------------------------------------------------------------------------------
# Class-balanced subsampling
# ----------------------------------------------------------------------------------------------


def test_n_is_class_balanced_reproducible_and_a_subset():
    X_all, y_all = load_dataset("digits")
    X, y = load_dataset("digits", n=100, random_state=0)
    assert X.shape == (100, 64)
    assert np.bincount(y).tolist() == [10] * 10
    X_again, y_again = load_dataset("digits", n=100, random_state=0)
    np.testing.assert_array_equal(X, X_again)
    np.testing.assert_array_equal(y, y_again)
    X_other, _ = load_dataset("digits", n=100, random_state=1)
    assert not np.array_equal(X, X_other)
    # every returned row is a row of the split, in the split's order
    positions = [
        np.flatnonzero((X_all == row).all(axis=1) & (y_all == label))[0]
        for row, label in zip(X, y, strict=True)
    ]
    assert positions == sorted(positions)


def test_n_with_a_remainder_and_a_generator():
    _, y = load_dataset("digits", split="test", n=25, random_state=np.random.default_rng(3))
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == 25 and set(counts.tolist()) == {2, 3}


def test_n_equal_to_the_split_returns_everything():
    X_all, y_all = load_dataset("digits", split="test")
    X, y = load_dataset("digits", split="test", n=450, random_state=0)
    np.testing.assert_array_equal(X, X_all)
    np.testing.assert_array_equal(y, y_all)


def test_n_with_a_small_class_takes_all_of_it(tmp_path, rng):
    labels = [0, 0] + [1] * 6 + [2] * 6 + [3] * 6  # class sizes 2, 6, 6, 6
    _write_mnist(tmp_path, rng, gz=False, labels=labels)
    _, y = load_dataset("mnist", root=tmp_path, n=14, random_state=0)
    assert np.bincount(y).tolist() == [2, 4, 4, 4]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    data=st.data(),
)
def test_balanced_subset_is_max_min_fair(counts, data):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(0).shuffle(labels)
    n = data.draw(st.integers(1, len(labels)))
    keep = _balanced_subset(labels, n, np.random.default_rng(data.draw(st.integers(0, 99))))
    assert len(keep) == n and len(np.unique(keep)) == n
    assert np.all(np.diff(keep) > 0)
    quota = np.bincount(labels[keep], minlength=len(counts))
    assert np.all(quota <= counts)
    # no class could be given more while another (not exhausted) has two fewer or more
    for a in range(len(counts)):
        for b in range(len(counts)):
            if quota[a] + 1 < quota[b]:
                assert quota[a] == counts[a]


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "numpy", "bytes"])
def test_cifar10_reads_back_exactly(tmp_path, rng, style):
    written = _write_cifar(tmp_path, rng, style)
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])

    X, y = load_dataset("cifar10", root=tmp_path, unit_scale=False)
    assert X.shape == (100, 3072) and X.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(X, train_data)
    np.testing.assert_array_equal(y, train_labels)

    X, y = load_dataset("cifar10", root=tmp_path, split="test")
    np.testing.assert_array_equal(X, written["test_batch"][0].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, written["test_batch"][1])

    images, _ = load_dataset("cifar10", root=tmp_path, split="test", flatten=False)
    assert images.shape == (N_IMAGES, 3, 32, 32)
    raw = written["test_batch"][0]
    # channel-first: the first 1024 bytes are red, row-major over 32×32
    assert images[3, 1, 5, 7] == np.float32(raw[3, 1024 + 5 * 32 + 7]) / 255
    assert images[4, 2, 31, 0] == np.float32(raw[4, 2048 + 31 * 32]) / 255


def test_cifar10_subsample(tmp_path, rng):
    _write_cifar(tmp_path, rng, "numpy")
    X, y = load_dataset("cifar10", root=tmp_path, n=30, random_state=0)
    assert X.shape == (30, 3072) and np.bincount(y).tolist() == [3] * 10


# torchvision unpickles the real files' ``numpy.core`` references through numpy 2's shim
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cifar10_agrees_with_torchvision(tmp_path, rng, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    _write_cifar(tmp_path, rng, "py2")
    meta = {"label_names": [str(i) for i in range(10)], "num_vis": 3072}
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # no md5s
    for split in ("train", "test"):
        reference = cifar.CIFAR10(str(tmp_path), train=split == "train")
        X, y = load_dataset("cifar10", root=tmp_path, split=split, flatten=False, unit_scale=False)
        np.testing.assert_array_equal(X, reference.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(y, reference.targets)


# ----------------------------------------------------------------------------------------------
# Tampered and malformed CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------


class _ShellPayload:
    """Unpickling this would run a shell command (it touches ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _ExecPayload:
    """Unpickling this would run Python code through ``builtins.exec``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _EvalPayload:
    """Unpickling this would evaluate Python code through ``builtins.eval``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _write_batch_object(tmp_path: Path, obj: object, protocol: int = 4) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


@pytest.mark.parametrize("payload", [_ShellPayload, _ExecPayload, _EvalPayload])
@pytest.mark.parametrize("where", ["top", "data", "labels"])
def test_tampered_pickle_is_refused_and_never_runs(tmp_path, payload, where):
    marker = tmp_path / "pwned"
    bomb = payload(marker)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    obj = bomb if where == "top" else {**batch, where.encode(): bomb}
    _write_batch_object(tmp_path, obj)
    with pytest.raises(ValueError, match=r"refusing to load the global '(posix|builtins)\.") as err:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert "test_batch" in str(err.value) and "nothing in it was executed" in str(err.value)
    assert not marker.exists()


def test_pickle_with_another_numpy_global_is_refused(tmp_path):
    # numpy.load would read an arbitrary (pickled) file: only array reconstruction is allowed
    _write_batch_object(tmp_path, {b"data": np.load, b"labels": [0]})
    with pytest.raises(ValueError, match=r"refusing to load the global 'numpy\.load'"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_handwritten_global_opcode_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=r"refusing to load the global 'posix\.system'"):
        load_dataset("cifar10", root=tmp_path, split="test")
    assert not marker.exists()


_GOOD_DATA = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([_GOOD_DATA, [0, 1]], "a CIFAR-10 batch is a dict; got list"),
        ({b"data": _GOOD_DATA}, r"needs the keys 'data' and 'labels'; missing \['labels'\]"),
        ({b"data": _GOOD_DATA.astype(np.float32), b"labels": [0, 1]}, "must be a uint8 array"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \(N, 3072\)"),
        ({b"data": np.zeros(3072, np.uint8), b"labels": [0]}, r"shape \(N, 3072\)"),
        ({b"data": bytes(3000), b"labels": [0]}, "not a multiple of 3072"),
        ({b"data": [[0] * 3072], b"labels": [0]}, "must be a uint8 numpy array or bytes"),
        ({b"data": _GOOD_DATA, b"labels": [0]}, r"one int per image \(2\)"),
        ({b"data": _GOOD_DATA, b"labels": [0.0, 1.0]}, "one int per image"),
        ({b"data": _GOOD_DATA, b"labels": "01"}, "must be a list of ints"),
        ({b"data": _GOOD_DATA, b"labels": [0, 10]}, "labels must lie in 0…9"),
        ({b"data": _GOOD_DATA, b"labels": [-1, 0]}, "labels must lie in 0…9"),
    ],
)
def test_malformed_batch_is_rejected(tmp_path, obj, message):
    _write_batch_object(tmp_path, obj)
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", root=tmp_path, split="test")


@pytest.mark.parametrize(
    "content", [b"", b"not a pickle at all", _py2_cifar_batch(_GOOD_DATA, [0, 1])[:-40]]
)
def test_unreadable_batch_is_rejected(tmp_path, content):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable CIFAR-10 batch pickle"):
        load_dataset("cifar10", root=tmp_path, split="test")


# ----------------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_back_exactly(tmp_path, rng, gz):
    written = _write_mnist(tmp_path, rng, gz=gz)
    for split in ("train", "test"):
        images, labels = written[split]
        X, y = load_dataset("mnist", root=tmp_path, split=split, unit_scale=False)
        assert X.shape == (N_IMAGES, 784) and X.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(X, images.reshape(N_IMAGES, 784))
        np.testing.assert_array_equal(y, labels)
    X, _ = load_dataset("mnist", root=tmp_path, split="test", flatten=False)
    assert X.shape == (N_IMAGES, 1, 28, 28)
    np.testing.assert_array_equal(X[:, 0], written["test"][0].astype(np.float32) / 255)


def test_mnist_prefers_the_plain_file_over_the_gzipped_one(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=True)
    plain = _write_mnist(tmp_path / "other", rng, gz=False)
    for file in (tmp_path / "other" / "MNIST" / "raw").iterdir():
        file.rename(tmp_path / "MNIST" / "raw" / file.name)
    X, y = load_dataset("mnist", root=tmp_path, unit_scale=False)
    np.testing.assert_array_equal(X, plain["train"][0].reshape(N_IMAGES, 784))
    np.testing.assert_array_equal(y, plain["train"][1])


def test_mnist_agrees_with_torchvision(tmp_path, rng):
    datasets = pytest.importorskip("torchvision.datasets")
    _write_mnist(tmp_path, rng, gz=False)
    for split in ("train", "test"):
        reference = datasets.MNIST(str(tmp_path), train=split == "train")
        X, y = load_dataset("mnist", root=tmp_path, split=split, flatten=False, unit_scale=False)
        np.testing.assert_array_equal(X[:, 0], reference.data.numpy())
        np.testing.assert_array_equal(y, reference.targets.numpy())


def _idx_bytes(type_code: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (b"\x01\x02", "bad magic number"),
        (b"\x01\x00\x08\x03" + bytes(12), "bad magic number"),
        (_idx_bytes(0x0D, (20, 28, 28), bytes(20 * 784 * 4)), "got type 0x0d with 3"),
        (_idx_bytes(0x08, (20, 784), bytes(20 * 784)), "with 3 dimension"),
        (_idx_bytes(0x08, (20, 28, 28), bytes(20 * 784 - 1)), "holds 15679 data bytes"),
        (_idx_bytes(0x08, (20, 32, 32), bytes(20 * 1024)), "MNIST images are 28×28"),
        (_idx_bytes(0x08, (19, 28, 28), bytes(19 * 784)), "holds 20 labels but"),
    ],
)
def test_malformed_idx_is_rejected(tmp_path, rng, images, message):
    _write_mnist(tmp_path, rng, gz=False)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(images)
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", root=tmp_path)


def test_mnist_labels_out_of_range_are_rejected(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=False, labels=[0] * 19 + [10])
    with pytest.raises(ValueError, match="labels must lie in 0…9"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("content", [b"plain bytes", None])
def test_broken_gzip_is_rejected(tmp_path, rng, content):
    _write_mnist(tmp_path, rng, gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(content if content is not None else path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="is not a valid gzip file"):
        load_dataset("mnist", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# SVHN
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_reads_back_exactly(tmp_path, rng, split):
    mat_X, mat_y = _write_svhn(tmp_path, rng, split)
    X, y = load_dataset("svhn", root=tmp_path, split=split, flatten=False, unit_scale=False)
    assert X.shape == (N_IMAGES, 3, 32, 32) and X.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(X, mat_X.transpose(3, 2, 0, 1))
    assert X[7, 2, 3, 30] == mat_X[3, 30, 2, 7]
    expected = mat_y[:, 0].astype(np.int64)
    expected[expected == 10] = 0
    np.testing.assert_array_equal(y, expected)
    assert sorted(set(y.tolist())) == list(range(10))
    X_flat, _ = load_dataset("svhn", root=tmp_path, split=split)
    np.testing.assert_array_equal(X_flat, X.reshape(N_IMAGES, 3072) / np.float32(255))


def test_svhn_agrees_with_torchvision(tmp_path, rng, monkeypatch):
    svhn = pytest.importorskip("torchvision.datasets.svhn")
    _write_svhn(tmp_path, rng, "test")
    monkeypatch.setattr(svhn, "check_integrity", lambda *args, **kwargs: True)  # no md5s
    reference = svhn.SVHN(str(tmp_path), split="test")
    X, y = load_dataset("svhn", root=tmp_path, split="test", flatten=False, unit_scale=False)
    np.testing.assert_array_equal(X, reference.data)
    np.testing.assert_array_equal(y, reference.labels)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "holds the variables 'X' and 'y'"),
        ({"X": np.zeros((3, 32, 32, 2), np.uint8), "y": [[1], [2]]}, r"shape \(32, 32, 3, N\)"),
        ({"X": np.zeros((32, 32, 3, 2)), "y": [[1], [2]]}, "must be a uint8 array"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1], [2], [3]]}, "one integer label"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1.5], [2.0]]}, "one integer label"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [1]]}, "labels must lie in 1…10"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1], [11]]}, "labels must lie in 1…10"),
    ],
)
def test_malformed_svhn_is_rejected(tmp_path, variables, message):
    scipy.io.savemat(tmp_path / "train_32x32.mat", variables)
    with pytest.raises(ValueError, match=message):
        load_dataset("svhn", root=tmp_path)


def test_svhn_file_that_is_not_a_mat_file_is_rejected(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"definitely not MATLAB")
    with pytest.raises(ValueError, match=r"is not a readable SVHN \.mat file"):
        load_dataset("svhn", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# Missing files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "split", "expected", "how"),
    [
        ("cifar10", "train", "cifar-10-batches-py/data_batch_1", "CIFAR10('data', download=True)"),
        ("cifar10", "test", "cifar-10-batches-py/test_batch", "CIFAR10('data', download=True)"),
        ("mnist", "train", "MNIST/raw/train-images-idx3-ubyte", "MNIST('data', download=True)"),
        ("mnist", "test", "MNIST/raw/t10k-images-idx3-ubyte", "MNIST('data', download=True)"),
        ("svhn", "train", "train_32x32.mat", "SVHN('data', split='train', download=True)"),
        ("svhn", "test", "test_32x32.mat", "SVHN('data', split='test', download=True)"),
    ],
)
def test_missing_folder_names_the_expected_file(tmp_path, name, split, expected, how):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=root, split=split)
    message = str(err.value)
    assert str(root / expected) in message
    assert f"the folder {root} does not exist" in message
    assert how in message and "never downloads" in message and "DEEPRFM_DATA" in message


def test_missing_file_in_an_existing_folder_is_named(tmp_path, rng):
    _write_cifar(tmp_path, rng, "numpy")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "does not exist" not in str(err.value)
    load_dataset("cifar10", root=tmp_path, split="test")  # the test split is complete


def test_missing_mnist_labels_are_named(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=True)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\)"
    ):
        load_dataset("mnist", root=tmp_path, split="test")


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"name must be one of \('digits', 'cifar10', 'mnist'"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match="name must be a str"):
        load_dataset(10)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"split": "val"}, ValueError, r"split must be one of \('train', 'test'\)"),
        ({"split": None}, ValueError, "split must be one of"),
        ({"n": 0}, ValueError, "n must be a positive int"),
        ({"n": -5}, ValueError, "n must be a positive int"),
        ({"n": 2.5}, TypeError, "n must be a positive int"),
        ({"n": "10"}, TypeError, "n must be a positive int"),
        ({"n": True}, TypeError, "n must be a positive int"),
        ({"n": 1348}, ValueError, "n=1348 exceeds the 1347 samples available in the digits"),
        ({"flatten": "yes"}, TypeError, "flatten must be a bool"),
        ({"unit_scale": 255}, TypeError, "unit_scale must be a bool"),
        ({"random_state": "seed"}, TypeError, "random_state must be an int"),
        ({"random_state": 1.0}, TypeError, "random_state must be an int"),
        ({"random_state": -1}, ValueError, "random_state must be a non-negative int"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_dataset("digits", **kwargs)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_bad_root_type(name):
    with pytest.raises(TypeError, match="root must be a path"):
        load_dataset(name, root=123)


def test_n_larger_than_a_file_split(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=False)
    with pytest.raises(ValueError, match="n=21 exceeds the 20 samples available in the mnist"):
        load_dataset("mnist", root=tmp_path, n=21)


def test_numpy_integer_arguments_are_accepted():
    X, _ = load_dataset("digits", n=np.int64(20), random_state=np.int32(4))
    assert X.shape == (20, 64)
