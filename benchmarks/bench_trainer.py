"""Training throughput and peak memory of `cmiexp` against the Hugging Face Trainer, the per-epoch
cost of the CMI objectives and of KD with cached teacher logits relative to plain CE, and the ratios
of issue 16's goals. Everything is measured in this one invocation; nothing is hard-coded.

    python benchmarks/bench_trainer.py                 # tiny-bert, SST-2 from ../shared, 3 interleaved repeats
    python benchmarks/bench_trainer.py --quick         # a CI-sized run (tests/test_benchmarks.py)
    python benchmarks/bench_trainer.py --model bert-base-uncased --samples 20000 --batch 32   # on a GPU

Each measurement runs in its own process (fresh peak-memory counters), started as `python -m cmiexp`
with this interpreter, or as $CMIEXP when it is set (the scripts' convention, e.g. CMIEXP=cmiexp or a
launcher prefix); only the training loop is timed, so how the process starts does not enter a ratio
(the tests start them warm, forked from a server, whose peak-memory counters start at the server's).
The configurations are run in interleaved repeats (HF, ce, cmi_min, ..., then again), so load from
other users of the machine falls on all of them alike; the table shows medians and every ratio is the median of the ratios
within a repeat. Both trainers use the same model files, data, batch size, precision, learning rate,
dynamic padding and one epoch; the Trainer runs at its defaults otherwise (no length grouping), with
evaluation, saving and logging off; cmiexp's timing (results.json train_samples_per_s) excludes its
evaluation and checkpoint writes but includes the CMI objectives' centroid full passes. The KD
student reads the teacher logits from a cache built once before the repeats (its build time is
reported separately, and amortised over seeds, since every seed and epoch reuses the cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import shlex
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



COMMON_KEYS = ("samples_per_s", "time_s", "peak_memory_mb")


def cmiexp_args(a, extra: list[str]) -> list[str]:
    return [f"task=glue/{a.task}", f"task.data_dir={a.glue_dir}", f"task.max_train_samples={a.samples}",
            "task.max_eval_samples=64", f"task.max_length={a.max_length}", f"model={a.model}",
            f"trainer.batch_size={a.batch}", "trainer.epochs=1", f"trainer.mixed_precision={a.mixed_precision}",
            "trainer.progress_bar=false", "trainer.checkpoint_retention=none", f"seed={a.seed}", *extra]


def cmiexp_command() -> list[str]:
    """How a measured run is started: $CMIEXP (as in scripts/lib/args.sh), else this Python's -m cmiexp."""
    return shlex.split(os.environ["CMIEXP"]) if os.environ.get("CMIEXP") else [sys.executable, "-m", "cmiexp"]


def run_cmiexp(name: str, extra: list[str], a, out: Path, cache: Path) -> dict:
    env = dict(os.environ, CMIEXP_OUTPUT_DIR=str(out), CMIEXP_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    cmd = [*cmiexp_command(), *cmiexp_args(a, extra)]
    t = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cmiexp {name} failed:\n{proc.stderr[-2000:]}")
    (res_file,) = [f for f in out.rglob("results.json") if "teachers" not in f.parts]
    res = json.loads(res_file.read_text())
    loop_s = res["num_train_samples"] / res["train_samples_per_s"]
    summary = res.get("objective_summary") or {}
    return {"samples_per_s": res["train_samples_per_s"], "time_s": loop_s, "peak_memory_mb": res["peak_memory_mb"],
            "centroid_pass_s": float(summary.get("centroid_pass_s") or 0.0),
            "cache_build_s": float(summary.get("cache_build_s") or 0.0), "process_s": time.time() - t,
            "run_dir": str(res_file.parent), "accuracy": res["final"]["metrics"].get("accuracy")}


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
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"HF Trainer run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(teacher: str) -> dict[str, list[str] | None]:
    """name -> cmiexp overrides (None: the HF Trainer). mcmi starts from the pretrained model here: its
    per-epoch cost does not depend on where it starts, and start=ce would train a CE model first."""
    no_save = ["trainer.save_best=false"]
    return {
        "hf_trainer": None,
        "ce": ["objective=ce", *no_save],
        "ce_no_grouping": ["objective=ce", "trainer.group_by_length=false", *no_save],
        "cmi_min_online": ["objective=cmi_min", "objective.centroids=online", *no_save],
        "cmi_min_epoch": ["objective=cmi_min", "objective.centroids=epoch", *no_save],
        "mcmi_online": ["objective=mcmi", "objective.start=pretrained", "objective.centroids=online", *no_save],
        "mcmi_fixed": ["objective=mcmi", "objective.start=pretrained", "objective.centroids=fixed", *no_save],
        "kd_cached": ["objective=kd", f"objective.teacher={teacher}", "objective.teacher_cache=true", *no_save],
    }


def machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU {cpu}, {os.cpu_count()} cores, load average {load:.1f} at the start (torch {torch.__version__})"


def ratio(rows: dict, a: str, b: str, key: str = "time_s") -> float:
    """Median over repeats of rows[a][r][key] / rows[b][r][key] (pairs measured in the same repeat)."""
    return statistics.median(x[key] / y[key] for x, y in zip(rows[a], rows[b]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=str(DEFAULT_GLUE))
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    p.add_argument("--only", default=None, help="comma-separated configurations (default: all)")
    p.add_argument("--quick", action="store_true", help="a small run for CI-sized checks (1 repeat, 128 samples)")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats, a.max_length = min(a.samples, 128), 1, min(a.max_length, 64)
    if a.mixed_precision == "auto":
        from cmiexp.train.optim import resolve_mixed_precision

        a.mixed_precision = resolve_mixed_precision("auto")
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        # Warm the caches (tiny model, tokenised split) so no measured run pays for building them; this
        # run's best checkpoint is the KD teacher (same architecture as the student: the per-step cost
        # of KD does not depend on the teacher once its logits are cached).
        warm = run_cmiexp("warm", ["objective=ce", "trainer.save_best=true"], a, tmp / "warm", cache)
        todo = configs(warm["run_dir"])
        if a.only:
            keep = set(a.only.split(",")) | {"ce", "hf_trainer"}
            todo = {k: v for k, v in todo.items() if k in keep}
        build = None
        if "kd_cached" in todo:  # the teacher-logit cache, built once (what the first seed pays)
            build = run_cmiexp("kd cache build", todo["kd_cached"], a, tmp / "kd_build", cache)["cache_build_s"]
        rows: dict[str, list[dict]] = {k: [] for k in todo}
        for r in range(a.repeats):
            for name, extra in todo.items():
                out = tmp / f"{name}-{r}"
                rows[name].append(run_hf(a, out, cache) if extra is None else run_cmiexp(name, extra, a, out, cache))
                print(f"  repeat {r + 1}/{a.repeats} {name}: {rows[name][-1]['samples_per_s']:.1f} samples/s",
                      file=sys.stderr, flush=True)
    print(f"model={a.model} task={a.task} samples={a.samples} batch={a.batch} max_length={a.max_length} "
          f"precision={a.mixed_precision} epochs=1 repeats={a.repeats} (interleaved, medians)")
    print(f"machine: {where}")
    print(f"{'run':<18}{'samples/s':>12}{'time s':>10}{'centroid s':>12}{'peak MB':>10}")
    for k, rs in rows.items():
        med = {key: statistics.median(x.get(key, 0.0) for x in rs) for key in (*COMMON_KEYS, "centroid_pass_s")}
        print(f"{k:<18}{med['samples_per_s']:>12.1f}{med['time_s']:>10.2f}{med['centroid_pass_s']:>12.2f}"
              f"{med['peak_memory_mb']:>10.0f}")
    print(f"goal 1  ce / HF Trainer throughput: {1 / ratio(rows, 'ce', 'hf_trainer'):.2f}x (target >= 1.2x)")
    if "ce_no_grouping" in rows:
        print(f"        of which length grouping: ce / ce with trainer.group_by_length=false: "
              f"{1 / ratio(rows, 'ce', 'ce_no_grouping'):.2f}x")
    for name in ("cmi_min_online", "cmi_min_epoch", "mcmi_online", "mcmi_fixed"):
        if name in rows:
            print(f"goal 2  {name} epoch time over ce, centroid work included: "
                  f"{100 * (ratio(rows, name, 'ce') - 1):+.1f}% (target <= +3%)")
    if "kd_cached" in rows:
        kd = ratio(rows, "kd_cached", "ce")
        ce_s = statistics.median(x["time_s"] for x in rows["ce"])
        print(f"goal 3  kd (cached teacher logits) epoch time / ce: {kd:.2f}x (target <= 1.1x)")
        print(f"        cache build (once, reused by every epoch and seed): {build:.2f} s = {build / ce_s:.2f} ce epochs; "
              f"amortised over 1 / 5 seeds of one epoch: {kd + build / ce_s:.2f}x / {kd + build / ce_s / 5:.2f}x")


if __name__ == "__main__":
    main()
