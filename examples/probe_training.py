"""Probing a small CNN on digits every epoch: Neural Feature Ansatz and collapse curves.

Trains a four-layer CNN (three 3×3 convolutions, two Linear layers) on the training split of
scikit-learn's digits (8×8 images) with SGD, and after every epoch (and at initialisation)
measures with :class:`deeprfm.probes.NeuralProbe`, on a fixed set of training images:

* ``nfa_corr`` — Pearson correlation of each layer's NFM WᵀW with its AGOP^1/2 (for the
  convolutions the AGOP over C_in·3·3 patches),
* ``nc1`` — (1/K) tr(Σ_W Σ_B^†) of each layer's input features,
* ``ncc_acc`` — nearest-class-centre accuracy of those features.

It prints one line per epoch and writes to ``--out`` (default: a fresh temporary folder):

* ``collapse_curves.nc`` — the per-epoch root datasets stacked along ``epoch`` (dims
  ``epoch`` × ``layer``; read with ``xarray.open_dataset``),
* ``probe_final.nc`` — the last epoch's whole DataTree, with each layer's NFM and AGOP
  (read with ``xarray.open_datatree``),
* ``collapse_curves.png`` — NC1 and the NFA correlation against the layer, one line per epoch.

Run ``python examples/probe_training.py [--small] [--out DIR] [--epochs N]``;
``DEEPRFM_SMALL=1`` is the same as ``--small`` (under a minute on two CPU cores).
"""

from __future__ import annotations

import argparse

import matplotlib
import torch
from _example import example_parser, output_dir
from torch import nn

from analysis import plot_collapse, stack_curves
from deeprfm.data import load_dataset
from deeprfm.probes import NeuralProbe

#: (epochs, images probed) of each mode.
NORMAL = (12, 1000)
SMALL = (4, 300)
BATCH_SIZE = 32


def parse_args() -> argparse.Namespace:
    """Command-line arguments: ``--small``, ``--out``, ``--epochs`` and ``--seed``."""
    parser = example_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    return parser.parse_args()


def small_cnn() -> nn.Sequential:
    """8×8 grey images -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).float().mean())


def main() -> None:
    args = parse_args()
    epochs, probed = SMALL if args.small else NORMAL
    epochs = args.epochs if args.epochs is not None else epochs
    out = output_dir(args.out, "probe_training_")
    torch.manual_seed(args.seed)

    X_train, y_train = (torch.from_numpy(a) for a in load_dataset("digits", flatten=False))
    X_test, y_test = (
        torch.from_numpy(a) for a in load_dataset("digits", split="test", flatten=False)
    )
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X_train, y_train),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # The probed images are fixed: every pass of every measurement sees the same samples.
    probe_data = (X_train[:probed], y_train[:probed])
    first, last = "0", "10"

    trees = {}
    with NeuralProbe(model) as probe:
        print(f"layers: {probe.layer_names}; probing {probed} training images")
        print(f"{'epoch':>5} {'test acc':>8} {'nfa_corr ' + first:>11} {'nc1 ' + last:>9}")
        for epoch in range(epochs + 1):
            if epoch > 0:
                model.train()
                for x, y in loader:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    optimizer.step()
            trees[epoch] = probe.measure(probe_data)
            ds = trees[epoch].ds.sel(stage="input")
            print(
                f"{epoch:>5d} {accuracy(model, X_test, y_test):>8.3f} "
                f"{float(ds.nfa_corr.sel(layer=first)):>11.3f} "
                f"{float(ds.nc1.sel(layer=last)):>9.3g}"
            )

    curves = stack_curves(
        {epoch: tree.ds.sel(stage="input") for epoch, tree in trees.items()}, dim="epoch"
    )
    curves.to_netcdf(out / "collapse_curves.nc", engine="h5netcdf")
    trees[epochs].to_netcdf(out / "probe_final.nc", engine="h5netcdf")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    plot_collapse(curves, ["nc1"], ax=left)
    left.set_title("NC1 of each layer's input")
    for epoch in curves.epoch.values:
        shade = plt.get_cmap("viridis")(0.9 * epoch / max(epochs, 1))
        right.plot(
            curves.nfa_corr.sel(epoch=epoch).values, marker="o", color=shade, label=f"epoch {epoch}"
        )
    right.set_xticks(range(curves.sizes["layer"]), curves.layer.values)
    right.set(xlabel="layer", ylabel="nfa_corr (NFM vs AGOP^1/2)", title="NFA by epoch")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "collapse_curves.png", dpi=120)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


if __name__ == "__main__":
    main()
