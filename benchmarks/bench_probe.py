"""NeuralProbe benchmark: seconds per sample of ``measure`` on torchvision resnet18 at 32×32.

Three configurations of an untrained ``resnet18(weights=None)`` on random 3×32×32 inputs:

* ``exact-10``: 10 outputs, exact AGOP (10 cotangents per sample),
* ``random-1000``: 1 000 outputs, 16 Gaussian projections (``agop_outputs=16``),
* ``exact-1000``: 1 000 outputs, exact (1 000 cotangents), for comparison (not in ``--small``).

For each it prints the seconds of every phase of ``measure``: the gradient pass (forward plus
batched backward), the two collapse passes (forward only), the NFM/AGOP matrices and the NFA
correlations (one ``eigh`` per layer, up to 4 608 × 4 608 for ``layer4``: a fixed cost per
call, independent of the number of samples), then milliseconds per sample of the data passes.

Run: ``python benchmarks/bench_probe.py [--small] [--device cpu|cuda] [--samples N]``.
``--small`` probes 32 samples and only the layers with fan-in ≤ 1 152 (the full set spends
minutes in the ``eigh`` of its 2 304- and 4 608-dimensional AGOPs on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

from deeprfm._memory import resolve_device
from deeprfm.probes import NeuralProbe

PHASES = ("gradients", "collapse", "matrices", "nfa")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--samples", type=int, default=None, help="samples per measure")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    return parser.parse_args()


def bench(name: str, classes: int, outputs, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=classes).to(device)
    n = args.samples
    X = torch.randn(n, 3, 32, 32, device=device)
    y = torch.arange(n, device=device) % 10
    loader = [
        (X[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, n, args.batch_size)
    ]
    layers = (lambda _, m: m.weight[0].numel() <= 1152) if args.small else "auto"
    probe = NeuralProbe(model, layers, agop_outputs=outputs, random_state=0)
    probe.measure(loader[:1])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    tree = probe.measure(loader)
    total = time.perf_counter() - start
    timings = json.loads(tree.attrs["timings"])
    passes = timings["gradients"] + timings["collapse"]
    return {
        "config": name,
        "layers": len(probe.layer_names),
        "cotangents": classes if outputs == "exact" else outputs,
        "samples": n,
        **{phase: timings[phase] for phase in PHASES},
        "total": total,
        "ms/sample": 1000 * passes / n,
    }


def main() -> None:
    args = parse_args()
    args.samples = args.samples or (32 if args.small else 256)
    device = resolve_device(args.device)
    configs = [("exact-10", 10, "exact"), ("random-1000", 1000, 16)]
    if not args.small:
        configs.append(("exact-1000", 1000, "exact"))
    print(
        f"NeuralProbe.measure, torchvision resnet18 at 32x32, device {device}, "
        f"{torch.get_num_threads()} CPU threads, batch size {args.batch_size}"
    )
    header = ["config", "layers", "cotangents", "samples", *PHASES, "total", "ms/sample"]
    print(" ".join(f"{h:>11}" for h in header))
    for name, classes, outputs in configs:
        row = bench(name, classes, outputs, args, device)
        cells = [
            f"{row[h]:>11.2f}" if isinstance(row[h], float) else f"{row[h]!s:>11}" for h in header
        ]
        print(" ".join(cells), flush=True)
    print(
        "phases in seconds; ms/sample = (gradients + collapse) / samples: the cost that grows "
        "with the data; matrices and nfa are per call"
    )


if __name__ == "__main__":
    main()
