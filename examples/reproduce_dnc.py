"""Reproduce the deep-neural-collapse paper on digits: Deep RFM, and an MLP stage by stage.

Beaglehole, Súkeník, Mondelli & Belkin, "Average gradient outer product as a mechanism for
deep neural collapse" (NeurIPS 2024, arXiv 2402.13728), on scikit-learn's digits (the library's
fixed 1 347 / 450 split, pixels standardised with the training split's mean and std):

1. **Deep RFM with the paper's settings** — 6 layers, Laplace kernel of bandwidth 2, ridge
   1e-3, one AGOP iteration per layer, ReLU random features of width 512 with ``nn.Linear``'s
   uniform weights and no bias, rows re-normalised on entering every layer, ±1 targets — for
   seeds 0, 1, 2. Per layer: NC1 in the paper's units (``nc1_trace / K``) and NC2 (the paper's
   ``nc2_dnc``) of the features entering the layer (X_l) and of the random features it outputs
   (φ(X_l M^{1/2})), with train and test accuracy of the layer's RFM. For comparison the same
   model with one setting changed at a time (rows normalised at the input only, one-hot
   targets, Gaussian weights, a bias).
2. **An MLP trained from a small initialisation** — 4 hidden ReLU layers of width 128, default
   PyTorch weights × 0.5, MSE on ±1 codes, SGD (lr 0.05, momentum 0.9, batch 128, 100
   epochs). ``NeuralProbe(stages=("input", "projected", "output"),
   output_stage="activation")`` measures NC1 of each layer's input h, of (WᵀW)^{1/2} h and of
   the output after the ReLU.

It prints the tables (Markdown) and writes to ``--out`` (default: a fresh temporary folder):

* ``deep_rfm_collapse.nc`` — the three ``collapse_`` datasets stacked along ``seed``,
* ``mlp_stages.nc`` — the probe's root dataset (dims ``layer`` × ``stage``),
* ``tables.md`` — the printed tables, as in docs/reproducing.md.

Run ``python examples/reproduce_dnc.py [--small] [--out DIR]`` (about a minute on two CPU cores);
``--small`` (or ``DEEPRFM_SMALL=1``) runs one seed, 3 layers and 20 MLP epochs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from _example import example_parser, output_dir
from sklearn.preprocessing import StandardScaler
from torch import nn

from deeprfm import DeepRFM, RFMClassifier
from deeprfm.data import load_dataset
from deeprfm.probes import NeuralProbe

#: (seeds, layers, MLP epochs) of each mode.
NORMAL = ((0, 1, 2), 6, 100)
SMALL = ((0,), 3, 20)
CLASSES = 10
#: Settings changed from the paper's, one at a time, and what they change.
VARIANTS = {
    "the paper's settings": {},
    'normalize_rows="input"': {"normalize_rows": "input"},
    'targets="onehot"': {"layer__targets": "onehot"},
    "Gaussian N(0, 1/d) weights": {"feature_params": {"init": "gaussian"}},
    "nn.Linear weights with a bias": {"feature_params": {"init": "torch", "bias": True}},
}


def standardised_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split with pixels standardised by the training split's mean and std."""
    X_train, y_train = load_dataset("digits", split="train")
    X_test, y_test = load_dataset("digits", split="test")
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


def paper_deep_rfm(layers: int, seed: int, **changes) -> DeepRFM:
    """A Deep RFM with the paper's settings (``changes``, as ``set_params`` takes them,
    overrides some of them)."""
    model = DeepRFM(
        layer=RFMClassifier(kernel="laplace", bandwidth=2.0, reg=1e-3, iters=1, targets="pm1"),
        layers=layers,
        width=512,
        feature_map="relu",
        feature_params={"init": "torch", "bias": False},
        normalize_rows="every_layer",
        random_state=seed,
    )
    return model.set_params(**changes)


def small_init_mlp(
    X: torch.Tensor, y: torch.Tensor, epochs: int = 100, scale: float = 0.5, seed: int = 0
) -> nn.Sequential:
    """A 4-hidden-layer ReLU MLP (width 128) trained with MSE on ±1 codes from a small init.

    Parameters
    ----------
    X : torch.Tensor, shape (n, d)
    y : torch.Tensor of int, shape (n,)
        Labels in 0 … 9.
    epochs : int
        Passes of SGD (lr 0.05, momentum 0.9) over shuffled batches of 128.
    scale : float
        Factor on PyTorch's default initial weights (biases start at 0).
    seed : int
        Seeds the initialisation and the batches.
    """
    torch.manual_seed(seed)
    sizes = [X.shape[1], 128, 128, 128, 128]
    modules: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        modules += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*modules, nn.Linear(sizes[-1], CLASSES))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(scale)
                module.bias.zero_()
    targets = 2 * F.one_hot(y, CLASSES).to(X.dtype) - 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), 128):
            batch = order[start : start + 128]
            loss = F.mse_loss(model(X[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def deep_rfm_table(collapse: xr.Dataset) -> list[str]:
    """Markdown rows: per layer, mean (min–max over seeds) of NC1, NC2 and accuracies."""

    def cell(values: xr.DataArray, digits: int) -> str:
        if values.sizes["seed"] == 1:
            return f"{float(values.mean()):.{digits}f}"
        low, high = float(values.min()), float(values.max())
        return f"{float(values.mean()):.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"

    rows = [
        "| layer | NC1 of X_l | NC1 of φ(X_l M^½) | NC2 of X_l | NC2 of φ(X_l M^½) "
        "| train acc | test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    nc1 = collapse.nc1_trace / CLASSES  # the paper's NC1
    for layer in collapse.layer.values:
        at = collapse.sel(layer=layer)
        nc1_at, nc2_at = nc1.sel(layer=layer), at.nc2_dnc
        rows.append(
            f"| {layer} | {cell(nc1_at.sel(stage='input'), 4)} "
            f"| {cell(nc1_at.sel(stage='features'), 4)} "
            f"| {cell(nc2_at.sel(stage='input'), 4)} | {cell(nc2_at.sel(stage='features'), 4)} "
            f"| {cell(at.train_acc, 3)} | {cell(at.eval_acc, 3)} |"
        )
    return rows


def variants_table(fits: dict[str, xr.Dataset]) -> list[str]:
    """Markdown rows: NC1 entering the first and last layers, its fall, last-layer test acc."""
    rows = ["| setting | NC1 of X_0 | NC1 of X_last | fall | test acc (last layer) |"]
    rows.append("|---|---|---|---|---|")
    for name, collapse in fits.items():
        nc1 = collapse.nc1_trace.sel(stage="input") / CLASSES
        first, last = nc1.isel(layer=0), nc1.isel(layer=-1)
        rows.append(
            f"| {name} | {float(first.mean()):.4f} | {float(last.mean()):.4f} "
            f"| {float((first / last).mean()):.0f}x "
            f"| {float(collapse.eval_acc.isel(layer=-1).mean()):.3f} |"
        )
    return rows


def stage_table(root: xr.Dataset) -> list[str]:
    """Markdown rows: NC1 (trace ratio) of every probed layer at every stage."""
    rows = ["| layer | NC1 of h | NC1 of (WᵀW)^½ h | NC1 of the output | output taken after |"]
    rows.append("|---|---|---|---|---|")
    for layer in root.layer.values:
        nc1 = root.nc1_trace.sel(layer=layer)
        rows.append(
            f"| {layer} | {float(nc1.sel(stage='input')):.4f} "
            f"| {float(nc1.sel(stage='projected')):.4f} | {float(nc1.sel(stage='output')):.4f} "
            f"| {root.output_source.sel(layer=layer).item()} |"
        )
    return rows


def main() -> None:
    args = example_parser(__doc__).parse_args()
    seeds, layers, epochs = SMALL if args.small else NORMAL
    out = output_dir(args.out, "deeprfm-reproduce-")
    X_train, X_test, y_train, y_test = standardised_digits()
    fits = {
        name: xr.concat(
            [
                paper_deep_rfm(layers, seed, **changes)
                .fit(X_train, y_train, eval_set=(X_test, y_test))
                .collapse_
                for seed in seeds
            ],
            dim=xr.DataArray(list(seeds), dims="seed", name="seed"),
        )
        for name, changes in VARIANTS.items()
    }
    lines = [f"## Deep RFM, the paper's settings, seeds {list(seeds)}", ""]
    lines += deep_rfm_table(fits["the paper's settings"])
    lines += ["", '## The same with normalize_rows="input"', ""]
    lines += deep_rfm_table(fits['normalize_rows="input"'])
    lines += ["", "## One setting changed at a time (mean over seeds)", ""]
    lines += variants_table(fits)
    fits["the paper's settings"].to_netcdf(out / "deep_rfm_collapse.nc")

    X = torch.tensor(X_train, dtype=torch.float32)
    y = torch.as_tensor(y_train)
    model = small_init_mlp(X, y, epochs=epochs, seed=args.seed)
    accuracy = float(
        (model(torch.tensor(X_test, dtype=torch.float32)).argmax(1) == torch.as_tensor(y_test))
        .float()
        .mean()
    )
    probe = NeuralProbe(
        model,
        agop=False,
        nfm=False,
        stages=("input", "projected", "output"),
        output_stage="activation",
    )
    root = probe.measure((X, y)).to_dataset()
    lines += [
        "",
        f"## MLP from a small initialisation ({epochs} epochs, test acc {accuracy:.3f})",
        "",
    ]
    lines += stage_table(root)
    root.to_netcdf(out / "mlp_stages.nc")

    text = "\n".join(lines)
    print(text)
    (out / "tables.md").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
