"""Throughput and memory of `cmiexp` against the Hugging Face Trainer, and the step-time overhead
of the CMI objectives over plain CE. Everything is measured in this one invocation; the script
prints ratios, nothing is hard-coded.

    python benchmarks/bench_trainer.py                        # tiny-bert, SST-2 from ../shared, CPU
    python benchmarks/bench_trainer.py --model bert-base-uncased --samples 20000 --batch 32   # on a GPU

Each measurement runs in its own process (fresh peak-memory counters). Both trainers use the same
model files, data, batch size, precision, learning rate, dynamic padding and one epoch; cmiexp's
timing excludes its evaluation and checkpoint writes (results.json train_samples_per_s), like the Trainer run with evaluation and saving off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = REPO.parent / "shared" / "data" / "glue"

HF_SCRIPT = r'''
import json, sys, time, resource, torch
from omegaconf import OmegaConf
from transformers import Trainer, TrainingArguments, DataCollatorWithPadding
from cmiexp.data import load_task
from cmiexp.data.tokenize import tokenize_split
from cmiexp.models.factory import resolve_model_path, load_tokenizer, load_model
cfg = OmegaConf.create(json.loads(sys.argv[1]))
task = load_task(cfg.task)
path = resolve_model_path(cfg.model, task, cfg.cache_dir)
tok = load_tokenizer(path, cfg.model)
train = tokenize_split(task.train, task, tok, cfg.task.max_length, cfg.cache_dir, "train").remove_columns(["idx"])
torch.manual_seed(cfg.seed)
model = load_model(path, cfg.model, task, kind="classification", tokenizer=tok)
args = TrainingArguments(output_dir=cfg.out, per_device_train_batch_size=cfg.batch, num_train_epochs=1,
    learning_rate=cfg.lr, weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0,
    save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
    bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16", use_cpu=not torch.cuda.is_available(),
    dataloader_num_workers=0, seed=cfg.seed)
trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
t = time.time(); trainer.train(); dt = time.time() - t
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"samples_per_s": len(train) / dt, "time_s": dt, "peak_memory_mb": peak}))
'''


def run_cmiexp(objective: str, a, out: Path, cache: Path) -> dict:
    env = dict(os.environ, CMIEXP_OUTPUT_DIR=str(out), CMIEXP_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "cmiexp", f"task=glue/{a.task}", f"task.data_dir={a.glue_dir}",
           f"task.max_train_samples={a.samples}", "task.max_eval_samples=64", f"task.max_length={a.max_length}",
           f"model={a.model}", f"objective={objective}", f"trainer.batch_size={a.batch}", "trainer.epochs=1",
           f"trainer.mixed_precision={a.mixed_precision}", "trainer.save_best=false", "trainer.progress_bar=false",
           f"seed={a.seed}"]
    t = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cmiexp {objective} failed:\n{proc.stderr[-2000:]}")
    (res_file,) = list(out.rglob(f"{objective}/*/results.json"))
    res = json.loads(res_file.read_text())
    loop_s = res["num_train_samples"] / res["train_samples_per_s"]
    pass_s = float((res.get("objective_summary") or {}).get("centroid_pass_s") or 0.0)
    return {"samples_per_s": res["train_samples_per_s"], "time_s": loop_s, "step_time_s": loop_s - pass_s,
            "centroid_pass_s": pass_s, "peak_memory_mb": res["peak_memory_mb"], "process_s": time.time() - t}


def run_hf(a, out: Path, cache: Path) -> dict:
    from omegaconf import OmegaConf

    from cmiexp.config import CONF_DIR

    model_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{a.model}.yaml"))
    cfg = {"task": {"name": f"glue/{a.task}", "loader": "glue", "dataset": a.task, "hub_path": "nyu-mll/glue",
                    "data_dir": str(a.glue_dir), "max_length": a.max_length, "max_train_samples": a.samples,
                    "max_eval_samples": 64, "subsample_seed": 0, "primary_metric": "accuracy"},
           "model": model_cfg, "cache_dir": str(cache), "out": str(out / "hf"), "batch": a.batch,
           "lr": float(model_cfg["lr"]), "seed": a.seed, "mixed_precision": a.mixed_precision}
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(cfg)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"HF Trainer run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=str(DEFAULT_GLUE))
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small run for CI-sized checks")
    a = p.parse_args(argv)
    if a.quick:
        a.samples = min(a.samples, 512)
    if a.mixed_precision == "auto":
        from cmiexp.train.runner import resolve_mixed_precision

        a.mixed_precision = resolve_mixed_precision("auto")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        # Warm the caches (tiny model, tokenised split) so neither side pays for building them.
        run_cmiexp("ce", argparse.Namespace(**{**vars(a), "samples": a.samples}), tmp / "warm", cache)
        rows = {"hf_trainer": run_hf(a, tmp, cache)}
        for obj in ("ce", "cmi_min", "mcmi"):
            rows[f"cmiexp_{obj}"] = run_cmiexp(obj, a, tmp / obj, cache)
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"model={a.model} task={a.task} samples={a.samples} batch={a.batch} max_length={a.max_length} "
          f"precision={a.mixed_precision} device={device} torch={torch.__version__}")
    print(f"{'run':<18}{'samples/s':>12}{'time s':>10}{'peak MB':>10}")
    for k, r in rows.items():
        print(f"{k:<18}{r['samples_per_s']:>12.1f}{r['time_s']:>10.2f}{r['peak_memory_mb']:>10.0f}")
    ce, hf = rows["cmiexp_ce"], rows["hf_trainer"]
    print(f"cmiexp ce / HF Trainer throughput: {ce['samples_per_s'] / hf['samples_per_s']:.2f}x")
    for obj in ("cmi_min", "mcmi"):
        r = rows[f"cmiexp_{obj}"]
        print(f"{obj} overhead over ce: training steps {100 * (r['step_time_s'] / ce['step_time_s'] - 1):+.1f}%, "
              f"with its centroid full passes ({r['centroid_pass_s']:.2f} s) {100 * (r['time_s'] / ce['time_s'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
