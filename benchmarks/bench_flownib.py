#!/usr/bin/env python
"""Time the batched all-layer FlowNIB probe against a one-layer-at-a-time loop.

Builds a synthetic cached activation set shaped like BERT-base (13 layers x N=5000 x 768, binary
labels; ``--quick``: 6 layers x 1000 x 64) and runs ``train_flownib`` twice with the same
settings: once with all layers' critics stacked (one batched computation per step) and once
with ``layerwise_loop=True``. Prints both wall times, their ratio and the largest difference
between the two runs' trajectories. Nothing is hard-coded: the numbers come from this run.

    python benchmarks/bench_flownib.py --quick
    python benchmarks/bench_flownib.py --steps 200 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cmiexp.probes.flownib import train_flownib


def synthetic_activations(layers: int, n: int, dim: int, num_classes: int, seed: int = 0):
    """x: Gaussian 'embeddings'; layer l mixes a fading copy of x with a growing class signal."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    centers = torch.randn(num_classes, dim, generator=g)
    z = torch.empty(layers, n, dim)
    for l in range(layers):
        w = (l + 1) / layers
        z[l] = (1 - w) * x + 2 * w * centers[y] + 0.5 * torch.randn(n, dim, generator=g)
    return x, z, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape and few steps")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 100 (quick 30); the paper uses 2000")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=None, help="critic width (default 128; quick 32)")
    ap.add_argument("--critic", default="concat", choices=["concat", "separable"])
    ap.add_argument("--estimator", default="dv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--record-every", type=int, default=5, help="trajectory point every N steps (probe default 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (6 if args.quick else 13)
    n = args.n or (1000 if args.quick else 5000)
    dim = args.dim or (64 if args.quick else 768)
    steps = args.steps or (30 if args.quick else 100)
    hidden = args.hidden or (32 if args.quick else 128)

    x, z, y = synthetic_activations(layers, n, dim, 2)
    kw = dict(steps=steps, batch_size=args.batch_size, hidden=hidden, critic=args.critic,
              estimator=args.estimator, device=args.device, seed=0, record_every=args.record_every)
    import os
    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"activations: {layers} layers x {n} x {dim}; {steps} steps, batch {args.batch_size}, "
          f"{args.critic} critic (hidden {hidden}), {args.estimator}, device {args.device}, "
          f"{torch.get_num_threads()} threads")

    # one short warm-up so that neither timing pays for first-call allocations
    train_flownib(x[:200], z[:, :200], y[:200], 2, **{**kw, "steps": 2})

    t = time.perf_counter()
    batched = train_flownib(x, z, y, 2, **kw)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = train_flownib(x, z, y, 2, layerwise_loop=True, **kw)
    t_loop = time.perf_counter() - t

    diff = max(np.abs(batched.ix - loop.ix).max(), np.abs(batched.iy - loop.iy).max())
    tb, tl = batched.timings["critic_training_s"], loop.timings["critic_training_s"]
    print(f"{'mode':<28}{'total s':>10}{'critics s':>11}{'s/step':>9}")
    print(f"{'batched (all layers)':<28}{t_batched:10.2f}{tb:11.2f}{tb / steps:9.4f}")
    print(f"{'loop (one layer at a time)':<28}{t_loop:10.2f}{tl:11.2f}{tl / steps:9.4f}")
    print(f"(total includes the d_eff eigendecompositions: {batched.timings['d_eff_s']:.2f}s and "
          f"{loop.timings['d_eff_s']:.2f}s)")
    print(f"speed-up loop/batched: critic training {tl / tb:.2f}x, total {t_loop / t_batched:.2f}x")
    print(f"max |trajectory difference| between the two modes: {diff:.2e} nats")
    print("final held-out I(X;Z_l): " + " ".join(f"{v:.2f}" for v in batched.heldout_ixz))
    print("final held-out I(Z_l;Y): " + " ".join(f"{v:.2f}" for v in batched.heldout_izy))


if __name__ == "__main__":
    main()
