"""Local dataset loaders: digits, CIFAR-10, MNIST and SVHN in torchvision's on-disk layout.

Nothing here downloads. ``digits`` is scikit-learn's bundled copy of the UCI optical digits; the
other datasets are read from a local folder laid out exactly as torchvision leaves it after
``download=True``, so a folder prepared on a machine with internet can be copied as is::

    <root>/
        cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
        MNIST/raw/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
                  t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]
        train_32x32.mat, test_32x32.mat                                      (SVHN)

``<root>`` defaults to ``$DEEPRFM_DATA`` if that variable is set, else ``~/.cache/deeprfm/data``
(see `default_root`). A missing folder or file raises `FileNotFoundError` naming the file that is
expected and how to obtain it.

The CIFAR-10 batches are pickles. They are read with an unpickler that refuses every global
except the three numpy reconstruction helpers an array needs, so a tampered file cannot run code;
the unpickled structure is then validated (keys, dtypes, shapes, label range).

Generated tasks need no files: `modular_arithmetic` (from :mod:`deeprfm.modular`, re-exported
here) builds (a ∘ b) mod p on one-hot pairs, the grokking setting.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from deeprfm._validation import numpy_generator
from deeprfm.distributed import shard_rows
from deeprfm.modular import MODULAR_OPERATIONS, ModularSplit, modular_arithmetic

try:  # numpy >= 2 moved the implementation to numpy._core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "MODULAR_OPERATIONS",
    "ModularSplit",
    "default_root",
    "load_dataset",
    "modular_arithmetic",
]

#: Names accepted by `load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "cifar10", "mnist", "svhn")

#: Environment variable that overrides the default data folder.
DATA_ENV_VAR = "DEEPRFM_DATA"

_SPLITS = ("train", "test")

#: digits has no official split: a stratified split with this test fraction and fixed seed.
_DIGITS_TEST_SIZE = 0.25
_DIGITS_SPLIT_SEED = 0

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_PIXELS = 3 * 32 * 32

_MNIST_DIR = Path("MNIST") / "raw"
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

_HOW_TO_GET = {
    "cifar10": (
        "On a machine with internet run\n"
        '    python -c "import torchvision; '
        "torchvision.datasets.CIFAR10('data', download=True)\"\n"
        "(or fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it), then "
        "copy the folder 'data/cifar-10-batches-py' into {root}."
    ),
    "mnist": (
        "On a machine with internet run\n"
        "    python -c \"import torchvision; torchvision.datasets.MNIST('data', download=True)\"\n"
        "then copy the folder 'data/MNIST' (it holds raw/ with the four IDX files, gzipped or "
        "not) into {root}."
    ),
    "svhn": (
        "On a machine with internet run\n"
        '    python -c "import torchvision; '
        "torchvision.datasets.SVHN('data', split='{split}', download=True)\"\n"
        "(or fetch http://ufldl.stanford.edu/housenumbers/{file}), then copy 'data/{file}' "
        "into {root}."
    ),
}

#: The only globals a CIFAR-10 batch may reference: numpy's array reconstruction (both the
#: numpy 1.x spelling found in the real files and the numpy 2 spelling numpy writes today).
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside `_PICKLE_GLOBALS`."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals and refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobalError(f"refusing to load the global '{module}.{name}'") from None


def default_root() -> Path:
    """The data folder used when ``root`` is not given.

    Returns
    -------
    pathlib.Path
        ``$DEEPRFM_DATA`` (with ``~`` expanded) if that environment variable is set and not
        empty, else ``~/.cache/deeprfm/data``. The folder is not created.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deeprfm" / "data"


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    n: int | None = None,
    flatten: bool = True,
    unit_scale: bool = True,
    random_state: int | np.random.Generator | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load an image-classification dataset from a local folder (never downloads).

    Parameters
    ----------
    name : {"digits", "cifar10", "mnist", "svhn"}
        Dataset (see `DATASETS`). ``digits`` is scikit-learn's bundled 8×8 digits (1797 images,
        no files needed); the others are read from ``root`` in torchvision's layout:
        ``cifar10`` from ``<root>/cifar-10-batches-py/`` (``data_batch_1`` … ``data_batch_5``,
        ``test_batch``), ``mnist`` from ``<root>/MNIST/raw/`` (the four IDX files, each either
        plain or ``.gz``; a plain file is preferred when both exist), ``svhn`` from
        ``<root>/train_32x32.mat`` / ``<root>/test_32x32.mat`` (SVHN's label 10 becomes 0).
    root : str or os.PathLike, optional
        Folder holding the dataset files; ``~`` is expanded. Default: `default_root`, i.e.
        ``$DEEPRFM_DATA`` if set, else ``~/.cache/deeprfm/data``. Ignored for ``digits``.
    split : {"train", "test"}, default "train"
        Official split. ``digits`` has none, so it is split once, stratified by class, into
        75 % train (1347 images) and 25 % test (450 images) with a fixed seed
        (``sklearn.model_selection.train_test_split(test_size=0.25, stratify=y,
        random_state=0)``); the two splits are disjoint and identical on every call.
    n : int, optional
        Return a class-balanced random subset of ``n`` samples of the split: every class present
        gets ``n // K`` or ``n // K + 1`` samples (a class with fewer samples gives all of them
        and the rest is spread over the others). The subset keeps the file order. Default: the
        whole split.
    flatten : bool, default True
        Return ``X`` as (N, C·H·W) rows, in channel-first (C, H, W) order, instead of images.
    unit_scale : bool, default True
        Scale pixel values to [0, 1]: divide by 255 (CIFAR-10, MNIST, SVHN) or by 16 (digits,
        whose pixels are 0…16). ``False`` keeps the raw pixel values (as float32).
    random_state : int, numpy.random.Generator or None, default None
        Seed or generator for the subset drawn when ``n`` is given; ``None`` draws a fresh one.
        It does not affect the digits train/test split.
    shard : (rank, world_size), optional
        Return only this rank's shard of the rows (after the subset of ``n``): the contiguous
        near-equal shards of :func:`deeprfm.distributed.shard_rows`, which together hold every
        row once, for data-parallel fits (``deeprfm.load_dataset(..., shard=(dist.get_rank(),
        dist.get_world_size()))``). With ``n``, give an int ``random_state`` so that every rank
        draws the same subset. Each rank reads the split's files whole.

    Returns
    -------
    X : numpy.ndarray of float32
        Shape (N, C·H·W) if ``flatten`` else (N, C, H, W): (N, 64) / (N, 1, 8, 8) for digits,
        (N, 3072) / (N, 3, 32, 32) for CIFAR-10 and SVHN, (N, 784) / (N, 1, 28, 28) for MNIST.
    y : numpy.ndarray of int64, shape (N,)
        Class labels in 0…9.

    Raises
    ------
    ValueError
        Unknown ``name`` or ``split``; ``n`` not positive or larger than the split; a file that
        is not in the expected format (including a pickle that references anything other than
        numpy arrays, which is refused before any of it runs).
    TypeError
        An argument of the wrong type.
    FileNotFoundError
        The dataset's folder or one of its files is missing; the message names the expected
        path and how to obtain the file.

    Examples
    --------
    >>> X, y = load_dataset("digits", split="test")
    >>> X.shape, X.dtype, y.dtype
    ((450, 64), dtype('float32'), dtype('int64'))
    >>> X, y = load_dataset("digits", n=100, flatten=False, random_state=0)
    >>> X.shape, np.bincount(y).tolist()
    ((100, 1, 8, 8), [10, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {DATASETS}; got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}; got {name!r}")
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}; got {split!r}")
    if n is not None:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be a positive int or None; got {n!r}")
        if n <= 0:
            raise ValueError(f"n must be a positive int or None; got {n}")
    for flag, value in (("flatten", flatten), ("unit_scale", unit_scale)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag} must be a bool; got {value!r}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike) or None; got {root!r}")
    rng = numpy_generator(random_state)
    if shard is not None:
        _check_shard(shard)
        if n is not None and not isinstance(random_state, (int, np.integer)):
            raise ValueError(
                "shard with n needs an int random_state, so that every rank draws the same subset"
            )

    if name == "digits":
        images, labels, pixel_max = _load_digits(split)
    else:
        base = default_root() if root is None else Path(root).expanduser()
        images, labels, pixel_max = _FILE_LOADERS[name](base, split)

    if len(labels) == 0:
        raise ValueError(f"the {name} {split!r} split's files hold no images")
    if n is not None:
        if n > len(labels):
            raise ValueError(
                f"n={n} exceeds the {len(labels)} samples available in the {name} {split!r} split"
            )
        keep = _balanced_subset(labels, n, rng)
        images, labels = images[keep], labels[keep]

    if shard is not None:
        rows = shard_rows(len(labels), *shard)
        images, labels = images[rows], labels[rows]
    X = np.ascontiguousarray(images, dtype=np.float32)
    if unit_scale:
        X /= np.float32(pixel_max)
    if flatten:
        X = X.reshape(len(X), -1)
    return X, labels.astype(np.int64)


def _check_shard(shard: object) -> None:
    """Raise TypeError/ValueError unless ``shard`` is a pair (rank, world_size) of ints with
    0 <= rank < world_size."""
    if not isinstance(shard, tuple) or len(shard) != 2:
        raise TypeError(f"shard must be a pair (rank, world_size) or None; got {shard!r}")
    for value in shard:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"shard must hold two ints (rank, world_size); got {shard!r}")
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank must lie in [0, world_size); got {shard!r}")


def _balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of ``n`` ≤ len(labels) samples.

    Classes are filled evenly; a class with fewer samples than its share contributes all of
    them and the remainder is re-spread over the others; the last ``r < K`` samples go to ``r``
    classes drawn at random.
    """
    classes, counts = np.unique(labels, return_counts=True)
    available = counts.copy()
    quota = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_classes = np.flatnonzero(available > 0)
        share = remaining // len(open_classes)
        if share == 0:
            extra = rng.choice(open_classes, size=remaining, replace=False)
            quota[extra] += 1
            break
        take = np.minimum(available[open_classes], share)
        quota[open_classes] += take
        available[open_classes] -= take
        remaining -= int(take.sum())
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
        if q > 0
    ]
    return np.sort(np.concatenate(chosen))


def _missing(
    name: str, expected: Path, root: Path, split: str, gz_ok: bool = False
) -> FileNotFoundError:
    """The error for a dataset file that is not where torchvision's layout puts it."""
    absent = expected
    while not absent.parent.exists() and absent.parent != absent:
        absent = absent.parent
    where = f" (or {expected.name}.gz)" if gz_ok else ""
    if absent != expected:
        where += f" (the folder {absent} does not exist)"
    how = _HOW_TO_GET[name].format(root=root, split=split, file=expected.name)
    return FileNotFoundError(
        f"{name} {split!r} split: expected the file {expected}{where}. deeprfm reads datasets "
        f"from a local folder and never downloads. {how} Alternatively pass root= or set "
        f"${DATA_ENV_VAR} to the folder that holds the data."
    )


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """scikit-learn's digits, (N, 1, 8, 8) pixels in 0…16, in the fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=_DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    keep = np.sort(train if split == "train" else test)
    return digits.images[keep, None], labels[keep], 16.0


def _load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """CIFAR-10 batches → uint8 (N, 3, 32, 32) and labels."""
    paths = [root / _CIFAR_DIR / file for file in _CIFAR_FILES[split]]
    for path in paths:
        if not path.is_file():
            raise _missing("cifar10", path, root, split)
    batches = [_read_cifar_batch(path) for path in paths]
    data = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return data.reshape(-1, 3, 32, 32), labels, 255.0


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Safely unpickle and validate one CIFAR-10 batch → uint8 (N, 3072), labels (N,)."""
    with open(path, "rb") as file:
        try:
            # latin1, as torchvision: the real files are Python 2 pickles whose str objects
            # (keys, the raw array bytes) need a byte-preserving decoding.
            obj = _CifarUnpickler(file, encoding="latin1").load()
        except _RefusedGlobalError as exc:
            raise ValueError(
                f"{path}: {exc}. A CIFAR-10 batch holds only a dict of bytes, str, lists, ints "
                "and numpy arrays, so this file is tampered with or not a CIFAR-10 batch; "
                "nothing in it was executed."
            ) from exc
        except Exception as exc:  # any failure to parse means the file is not a valid batch
            raise ValueError(
                f"{path} is not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict; got {type(obj).__name__}")
    entries = {key.decode("latin1") if isinstance(key, bytes) else key: v for key, v in obj.items()}
    missing = [key for key in ("data", "labels") if key not in entries]
    if missing:
        raise ValueError(
            f"{path}: a CIFAR-10 batch needs the keys 'data' and 'labels'; missing {missing}"
        )

    data = entries["data"]
    if isinstance(data, (bytes, bytearray)):
        if len(data) % _CIFAR_PIXELS:
            raise ValueError(
                f"{path}: 'data' holds {len(data)} bytes, not a multiple of {_CIFAR_PIXELS}"
            )
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_PIXELS)
    elif isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
            raise ValueError(
                f"{path}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}); "
                f"got {data.dtype} {data.shape}"
            )
    else:
        raise ValueError(
            f"{path}: 'data' must be a uint8 numpy array or bytes; got {type(data).__name__}"
        )

    raw_labels = entries["labels"]
    if not isinstance(raw_labels, (list, np.ndarray)):
        raise ValueError(
            f"{path}: 'labels' must be a list of ints; got {type(raw_labels).__name__}"
        )
    labels = np.asarray(raw_labels)
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: 'labels' must hold one int per image ({len(data)}); "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    _check_label_range(labels, 0, 9, path)
    return data, labels.astype(np.int64)


def _check_label_range(labels: np.ndarray, low: int, high: int, path: Path) -> None:
    if labels.size and (labels.min() < low or labels.max() > high):
        raise ValueError(
            f"{path}: labels must lie in {low}…{high}; got {labels.min()}…{labels.max()}"
        )


def _load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """MNIST IDX files → uint8 (N, 1, 28, 28) and labels."""
    images_path, labels_path = (_mnist_file(root, base, split) for base in _MNIST_FILES[split])
    images = _read_idx(images_path, ndim=3)
    labels = _read_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: MNIST images are 28×28; got {images.shape[1:]}")
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images"
        )
    _check_label_range(labels, 0, 9, labels_path)
    return images[:, None], labels.astype(np.int64), 255.0


def _mnist_file(root: Path, base: str, split: str) -> Path:
    """The plain IDX file if present, else its ``.gz`` version."""
    plain = root / _MNIST_DIR / base
    for path in (plain, plain.with_name(base + ".gz")):
        if path.is_file():
            return path
    raise _missing("mnist", plain, root, split, gz_ok=True)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) with ``ndim`` dimensions.

    The header is read first and then exactly the bytes it announces, so a small file whose
    header (or gzip stream) claims more is refused without reading or inflating the rest.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            header = file.read(4 + 4 * ndim)
            shape = _idx_shape(path, header, ndim)
            size = math.prod(shape)
            data = file.read(size)
            trailing = file.read(1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path} is not a valid gzip file ({exc})") from exc
    if len(data) != size or trailing:
        held = f"{len(data)}" if len(data) < size else f"more than {size}"
        raise ValueError(
            f"{path}: the header announces shape {shape} ({size} bytes) but the file holds "
            f"{held} data bytes"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _idx_shape(path: Path, header: bytes, ndim: int) -> tuple[int, ...]:
    """The shape an IDX header announces, after checking its magic number and type."""
    if len(header) < 4 + 4 * ndim or header[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if header[2] != _IDX_UBYTE or header[3] != ndim:
        raise ValueError(
            f"{path}: expected unsigned-byte IDX data (type 0x08) with {ndim} dimension(s); "
            f"got type 0x{header[2]:02x} with {header[3]}"
        )
    return struct.unpack(f">{ndim}I", header[4:])


def _load_svhn(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """SVHN ``*_32x32.mat`` → uint8 (N, 3, 32, 32) and labels with 10 mapped to 0."""
    from scipy.io import loadmat

    path = root / _SVHN_FILES[split]
    if not path.is_file():
        raise _missing("svhn", path, root, split)
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy raises several types for files it cannot parse
        raise ValueError(
            f"{path} is not a readable SVHN .mat file ({type(exc).__name__}: {exc})"
        ) from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: an SVHN .mat file holds the variables 'X' and 'y'")
    images, labels = mat["X"], mat["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise ValueError(
            f"{path}: 'X' must be a uint8 array of shape (32, 32, 3, N); "
            f"got {images.dtype} {images.shape}"
        )
    count = images.shape[3]
    if labels.dtype.kind not in "iu" or labels.size != count or labels.ndim > 2:
        raise ValueError(
            f"{path}: 'y' must hold one integer label per image ({count}); "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    labels = labels.reshape(-1).astype(np.int64)
    _check_label_range(labels, 1, 10, path)
    labels[labels == 10] = 0
    return images.transpose(3, 2, 0, 1), labels, 255.0


_FILE_LOADERS = {"cifar10": _load_cifar10, "mnist": _load_mnist, "svhn": _load_svhn}
