"""Benchmark: KD student training with cached teacher logits vs an online teacher forward, on CPU.

Trains one teacher (tiny-bert, twice the student's depth, like BERT-base vs DistilBERT), then the
same student (tiny-distilbert, same seed) four times: plain ce, kd with a cold cache (builds it),
kd with a warm cache (what every later seed and epoch pays), and kd with the online teacher. It
prints each run's training time and the ratios measured in this run, and checks that the cached
and online students reached the same dev metrics. Nothing is asserted about speed.

    python benchmarks/bench_kd_cache.py                       # RTE subset from ../shared/data/glue
    python benchmarks/bench_kd_cache.py --train-samples 1024 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from cmiexp.config import CONF_DIR
    from cmiexp.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="glue/rte")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher-layers", type=int, default=4, help="tiny-bert teacher depth (the student has 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from cmiexp.objectives.kd.teacher import ensure_teacher
    from cmiexp.train.runner import run_experiment

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-kd-"))
    common = [f"task={args.task}", f"task.data_dir={args.data_dir}", f"task.max_train_samples={args.train_samples}",
              f"task.max_eval_samples={args.eval_samples}", f"task.max_length={args.max_length}",
              f"trainer.epochs={args.epochs}", "trainer.progress_bar=false", "trainer.cpu=true",
              "model=tiny-distilbert", f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}", "seed=0"]
    teacher_model = f"{{name: tiny-bert, tiny: {{num_layers: {args.teacher_layers}}}}}"
    teacher_cfg = (f"objective.teacher_config={{model: {teacher_model}, objective: ce, "
                   f"trainer: {{epochs: {args.epochs}}}}}")

    print(f"teacher: tiny-bert x{args.teacher_layers} layers; student: tiny-distilbert x2; {args.task}, "
          f"{args.train_samples} train examples, {args.epochs} epochs, {args.threads} thread(s); out: {out}")
    from omegaconf import OmegaConf

    cfg = _compose(common + ["objective=kd", teacher_cfg])
    t0 = time.time()
    info = ensure_teacher(cfg, OmegaConf.to_container(cfg.objective.teacher_config, resolve=True))
    print(f"teacher {info.source} in {time.time() - t0:.1f} s: {info.run_dir}")

    runs = {
        "ce": common + ["objective=ce"],
        "kd cached (cold: builds cache)": common + ["objective=kd", teacher_cfg],
        "kd cached (warm)": common + ["objective=kd", teacher_cfg],
        "kd online teacher": common + ["objective=kd", teacher_cfg, "objective.teacher_cache=false"],
    }
    results = {}
    for i, (name, ov) in enumerate(runs.items()):
        res = run_experiment(_compose(ov), out / "runs" / f"{i}")
        s = res.get("objective_summary") or {}
        results[name] = res
        print(f"  {name:<32} train {res['wall_time_s']:7.2f} s  (cache build {s.get('cache_build_s', 0):.2f} s, "
              f"teacher {s.get('teacher_s_per_epoch', 0):.2f} s/epoch)")

    ce = results["ce"]["wall_time_s"]
    warm = results["kd cached (warm)"]["wall_time_s"]
    cold = results["kd cached (cold: builds cache)"]
    online = results["kd online teacher"]["wall_time_s"]
    print("\nmeasured in this run (training time incl. evaluation and checkpoints):")
    print(f"  online / cached teacher : {online / warm:.2f}x")
    print(f"  cached / ce             : {warm / ce:.2f}x")
    print(f"  online / ce             : {online / ce:.2f}x")
    print(f"  cache build             : {cold['objective_summary']['cache_build_s']:.2f} s once per teacher "
          f"(= {cold['objective_summary']['cache_build_s'] / max(online - warm, 1e-9) * args.epochs:.2f} "
          "epochs of online-teacher overhead)")
    a = results["kd cached (warm)"]["best"]["metrics"]
    b = results["kd online teacher"]["best"]["metrics"]
    same = a.get("accuracy") == b.get("accuracy") and abs(a.get("loss", 0) - b.get("loss", 0)) < 1e-5
    print(f"  cached and online students agree: {same} (dev accuracy {a.get('accuracy'):.4f} vs "
          f"{b.get('accuracy'):.4f})")
    (out / "bench_kd_cache.json").write_text(json.dumps(
        {k: {"wall_time_s": v["wall_time_s"], "objective_summary": v.get("objective_summary")}
         for k, v in results.items()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
