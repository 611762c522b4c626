#!/usr/bin/env python
"""Ground-truth benchmark of ``cmiexp.mi.estimate_mi``: every estimator against closed-form MI.

Tasks (``cmiexp.mi.groundtruth``), n = 5000 samples each: correlated Gaussians (d in {1, 5, 20,
50}, I in {0, 2, 4, 6, 10} nats) and Beyond-Normal-style tasks (dense/sparse multinormals up to
25x25, half-cube, asinh, normal CDF, wiggly, bimodal, spiral, Swiss roll, Student-t, additive
uniform noise). Prints estimate (mean +- std over seeds) vs truth per estimator, then per
estimator the mean absolute error over all tasks, over the Gaussian and the Beyond-Normal parts,
the worst estimate on independent data, the bias at I = 2 / 4 / 6 for d = 20, and seconds.

    python benchmarks/bench_mi.py                 # full table (README), about 30-40 min on 2 cores
    python benchmarks/bench_mi.py --quick         # 6 tasks, 1 seed, auto/copula/ksg/smile: ~1 min
    python benchmarks/bench_mi.py --estimators auto,infonce --seeds 2
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from cmiexp.mi import estimate_mi
from cmiexp.mi.groundtruth import beyond_normal_tasks, gaussian_tasks

QUICK_TASKS = ("gauss d=5 I=2", "gauss d=20 I=0", "gauss d=1 I=10", "spiral 3x3", "student-t 2x2 dof=2",
               "additive uniform eps=0.3")


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_estimator(est: str, x, y, seed: int) -> float:
    if est == "ksg" and x.shape[1] + y.shape[1] > 12:
        return float("nan")  # KSG is slow and badly biased in high dimension: not run there
    return estimate_mi(x, y, estimator=est, seed=seed)


def job(args) -> tuple[float, float]:
    """One (task, data seed, estimator) cell: (estimate, seconds). Data are regenerated from the
    seed in the worker, so parallel jobs see exactly what a serial run sees."""
    task_name, n, data_seed, est, seed, threads = args
    torch.set_num_threads(threads)
    task = {t.name: t for t in gaussian_tasks() + beyond_normal_tasks()}[task_name]
    x, y, _ = task.make(n, data_seed)
    t0 = time.perf_counter()
    v = run_estimator(est, x.astype(np.float32), y.astype(np.float32), seed)
    return v, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 tasks, 1 seed (about a minute)")
    ap.add_argument("--estimators", default=None,
                    help="comma list (default auto,copula,gaussian,ksg,infonce,mine)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per task (default 3; quick 1)")
    ap.add_argument("--n", type=int, default=5000, help="samples per task (default 5000)")
    ap.add_argument("--tasks", default=None, help="substring filter on task names")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (small critics: 1 is fastest)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (cells are independent)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    estimators = (args.estimators or ("auto,copula,ksg,smile" if args.quick
                                      else "auto,copula,gaussian,ksg,infonce,mine")).split(",")
    seeds = args.seeds or (1 if args.quick else 3)
    tasks = gaussian_tasks() + beyond_normal_tasks()
    if args.quick:
        tasks = [t for t in tasks if t.name in QUICK_TASKS]
    if args.tasks:
        tasks = [t for t in tasks if args.tasks in t.name]
    print(f"estimate_mi ground-truth suite: {len(tasks)} tasks, n={args.n}, {seeds} seed(s); machine: {machine()}")
    print("cells: mean ± std over seeds (nats); ksg is not run above 12 total dimensions; seconds are summed "
          "over the estimator's cells\n")
    head = f"{'task':<36}{'true':>7}" + "".join(f"{e:>16}" for e in estimators)
    print(head)
    print("-" * len(head))
    errors = {e: [] for e in estimators}
    gauss_err = {e: [] for e in estimators}
    bn_err = {e: [] for e in estimators}
    indep_min = {e: np.inf for e in estimators}
    bias20 = {e: {} for e in estimators}
    secs = {e: 0.0 for e in estimators}
    cells_in = [(task.name, args.n, 1000 + s, e, s, args.threads) for task in tasks for e in estimators
                for s in range(seeds)]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            outs = list(pool.map(job, cells_in))
    else:
        outs = [job(c) for c in cells_in]
    results = {(c[0], c[3], c[4]): o for c, o in zip(cells_in, outs)}
    for task in tasks:
        cells = []
        truth = task.make(10, 1000)[2]
        for e in estimators:
            vals = np.asarray([results[(task.name, e, s)][0] for s in range(seeds)])
            secs[e] += sum(results[(task.name, e, s)][1] for s in range(seeds))
            if np.isnan(vals).all():
                cells.append(f"{'—':>16}")
                continue
            err = float(np.mean(np.abs(vals - truth)))
            errors[e].append(err)
            (gauss_err if task.name.startswith("gauss") else bn_err)[e].append(err)
            if truth == 0:
                indep_min[e] = min(indep_min[e], float(vals.min()))
            if task.name.startswith("gauss d=20 ") and truth in (2.0, 4.0, 6.0):
                bias20[e][truth] = float(vals.mean() - truth)
            cells.append(f"{vals.mean():8.3f} ± {vals.std():5.3f}")
        print(f"{task.name:<36}{truth:7.3f}" + "".join(f"{c:>16}" for c in cells), flush=True)

    print("\nsummary (nats)")
    cols = ["MAE all", "MAE gauss", "MAE B-N", "min indep.", "bias d20 I=2", "I=4", "I=6", "seconds"]
    print(f"{'estimator':<12}" + "".join(f"{c:>14}" for c in cols))
    for e in estimators:
        all_e, g, bn = errors[e], gauss_err[e], bn_err[e]
        row = [np.mean(all_e) if all_e else np.nan, np.mean(g) if g else np.nan, np.mean(bn) if bn else np.nan,
               indep_min[e] if np.isfinite(indep_min[e]) else np.nan,
               bias20[e].get(2.0, np.nan), bias20[e].get(4.0, np.nan), bias20[e].get(6.0, np.nan), secs[e]]
        print(f"{e:<12}" + "".join(f"{v:14.3f}" for v in row))


if __name__ == "__main__":
    main()
