"""``cmiexp objective=flownib``: the FlowNIB layer probe as a run of its own.

A probe run trains no language model. It loads one, runs it once over a split of the task to
cache (X, Z_1..Z_L, Y), trains the FlowNIB critics of all layers together
(:func:`cmiexp.probes.flownib.train_flownib`) and writes into its own run directory
(``.../runs/<experiment>/<task>/<model>/flownib/seed<seed>...``):

* ``config.yaml``      the resolved config of the probe run
* ``flownib.json``     per layer: trajectory, OIC, d_eff, held-out estimates (+ the probe settings)
* ``flownib.csv``      one row per layer
* ``flownib_*.png``    information plane (trajectories coloured by step + OIC path), d_eff and OIC by layer
* ``compare_*``        with ``objective.compare``: this run overlaid with other probe runs
* ``results.json``     schema 1, like every run; ``best.metrics`` holds the summary numbers
  (``oic_y_mean`` is the primary metric: ``cmiexp-report --primary`` tabulates the average
  OIC I(Z;Y) over layers per model). Its ``teacher_objective`` is the probed run's objective
  (``untrained`` for the baseline), so probes of differently trained models get separate rows.

Which model (``objective.source``):

* a finished run directory: its ``checkpoint/best`` is probed with the tokenizer, head prompt
  and ``task.max_length`` it was trained with (its ``config.yaml``). Its task, model and head
  must be the probe's (``task=``, ``model=``, ``head=``): they name the probe's run directory and
  its report row, so a mismatch is refused rather than filed under the wrong name;
* ``null``: the untrained baseline, ``model=`` as loaded for fine-tuning (pretrained weights, or
  the tiny model's fixed initialisation) with a fresh head (seeded by ``seed``).

X is the embedding-layer output (``hidden_states[0]``), attention-masked mean pooled; Z_l is
layer l's output pooled by ``objective.pooling``; Y the label (one-hot for classification, a
standardised scalar for regression). Unlabelled rows are dropped. The pure helpers
(:func:`select_rows`, :func:`summary_metrics`, :func:`head_pooling`) carry the logic worth
testing; :func:`run_probe` wires them to the data, model and output code.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import CheckpointError, ConfigError, DataError
from cmiexp.io import atomic_write_text
from cmiexp.probes.inputs import ProbeSource, check_probe_inputs, compare_label, refuse_distributed
from cmiexp.runs import RunLock

log = logging.getLogger("cmiexp")

PRIMARY_METRIC = "oic_y_mean"


# ----------------------------------------------------------------------------- pure helpers


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else is passed on as given."""
    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"objective.device={device} but no CUDA device is available; use device=auto or cpu")
    return device


def select_rows(labels, is_regression: bool, max_samples: int | None, seed: int = 0) -> np.ndarray:
    """Positions of the rows to probe, ascending: labelled rows only (class id >= 0, or a finite
    regression target), and at most ``max_samples`` of them, drawn uniformly without replacement
    by a generator seeded with ``seed`` (a fixed subset, whatever the probe's seed)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y) if is_regression else (np.isfinite(y) & (y >= 0))
    pos = np.flatnonzero(keep)
    if max_samples is not None and pos.size > int(max_samples):
        pick = np.random.default_rng(int(seed)).choice(pos.size, size=int(max_samples), replace=False)
        pos = pos[np.sort(pick)]
    return pos


def summary_metrics(result) -> dict[str, float]:
    """Summary numbers of one probe (nats): mean/max over layers of the OIC coordinates, the
    last layer's OIC, mean held-out estimates and mean participation ratio."""
    from cmiexp.probes.flownib import as_result_dict

    d = as_result_dict(result)
    layers = d["layers"]
    if not layers:
        raise DataError("the probe produced no layers")
    ox = np.array([e["oic"]["x"] for e in layers], dtype=np.float64)
    oy = np.array([e["oic"]["y"] for e in layers], dtype=np.float64)
    hx = np.array([e["heldout"]["ixz"] for e in layers], dtype=np.float64)
    hy = np.array([e["heldout"]["izy"] for e in layers], dtype=np.float64)
    dpr = np.array([e["d_eff_pr"] for e in layers], dtype=np.float64)
    return {
        "oic_x_mean": float(ox.mean()), "oic_y_mean": float(oy.mean()),
        "oic_x_max": float(ox.max()), "oic_y_max": float(oy.max()),
        "oic_x_last": float(ox[-1]), "oic_y_last": float(oy[-1]),
        "heldout_ixz_mean": float(hx.mean()), "heldout_izy_mean": float(hy.mean()),
        "d_eff_pr_mean": float(dpr.mean()), "num_layers": len(layers),
    }


def head_pooling(pooling: str, head: str, family: str, mask_token_id: int | None = None
                 ) -> tuple[str, Callable | None]:
    """Map ``objective.pooling`` to what ``extract_activations`` takes.

    ``head`` = the token the model's head reads: the mask token (head=masking), the last attended
    token (head=generation; pooling head of decoders and encoder-decoders), the first token
    (pooling head of encoders: CLS)."""
    if pooling != "head":
        return pooling, None
    if head == "masking":
        if mask_token_id is None:
            raise ConfigError("objective.pooling=head with head=masking needs the tokenizer's mask token")
        from cmiexp.models.heads import mask_positions

        return "head", lambda ids, mask: mask_positions(ids, mask, int(mask_token_id))
    if head == "generation" or family in ("decoder", "seq2seq"):
        return "last", None
    return "cls", None


# ----------------------------------------------------------------------------- model and data


def _load_model(cfg, source: ProbeSource, task, cache_dir: Path):
    """(model, tokenizer, input suffix, head name, family, max_length) for the source or baseline."""
    from cmiexp.models.factory import load_tokenizer, resolve_model_path
    from cmiexp.models.heads import build_classifier, head_name, input_suffix, load_classifier

    if source.untrained:
        path = resolve_model_path(cfg.model, task, cache_dir)
        tokenizer = load_tokenizer(path, cfg.model)
        with torch.random.fork_rng(devices=[]):
            # A fresh head seeded like a fine-tuning run's: the baseline is that run's starting point.
            torch.manual_seed(int(cfg.seed))
            model = build_classifier(path, cfg, task, tokenizer)
        return (model, tokenizer, input_suffix(cfg, tokenizer), head_name(cfg),
                str(cfg.model.family), int(cfg.task.max_length))
    src = OmegaConf.create(source.config)
    try:
        tokenizer = load_tokenizer(str(source.checkpoint), src.model)
    except Exception as e:  # noqa: BLE001 - any failure means the checkpoint lacks a usable tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the tokenizer of {source.checkpoint}: {first}") from None
    try:
        model = load_classifier(str(source.checkpoint))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the model in {source.checkpoint}: {first}") from None
    max_len = int(source.config["task"]["max_length"])  # resolve_source checked it is there
    return (model, tokenizer, input_suffix(src, tokenizer), head_name(src),
            str(src.model.family), max_len)


def _probe_split(task, split: str):
    if split == "train":
        ds = task.train
    elif split in task.eval_splits:
        ds = task.eval_splits[split]
    else:
        ds = None
    if ds is None:
        valid = (["train"] if task.train is not None else []) + list(task.eval_splits)
        raise ConfigError(f"objective.split={split!r} is not a labelled split of task={task.name}; "
                          f"valid choices: {', '.join(valid)}")
    return ds


def _loader(tokenized, tokenizer, model, batch_size: int):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from cmiexp.models.heads import model_input_keys

    cols = ["input_ids", "attention_mask", "labels", "idx"]
    if "token_type_ids" in model_input_keys(model) and "token_type_ids" in tokenized.column_names:
        cols.append("token_type_ids")
    ds = tokenized.with_format(columns=[c for c in cols if c in tokenized.column_names])
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=DataCollatorWithPadding(tokenizer))


# ----------------------------------------------------------------------------- compare


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


# ----------------------------------------------------------------------------- the run


def _base_results(cfg, run_dir: Path, source: ProbeSource) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from cmiexp.runs import SCHEMA

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    head = source.describe()["head"] if not source.untrained else cfg.head.name
    peft = source.describe()["peft"] if not source.untrained else "none"
    return {
        "schema": SCHEMA, "status": "running", "error": None,
        "experiment": cfg.experiment_name, "task": cfg.task.name,
        "task_type": "classification", "model": cfg.model.name, "objective": cfg.objective.name,
        # The probed model's objective keeps probes of differently trained models in separate report
        # rows ("tiny-bert / flownib (teacher: ce)"); cmiexp-report then shows each against the CE one.
        "teacher_objective": "untrained" if source.untrained else source.describe()["objective"],
        "teacher_model": None, "seed": int(cfg.seed), "head": head, "peft": peft,
        "primary_metric": PRIMARY_METRIC, "overrides": overrides, "run_dir": str(run_dir.resolve()),
        "source": source.describe(),
    }


def run_probe(cfg: DictConfig, run_dir: str | os.PathLike, lock: RunLock | None = None) -> dict:
    """Run the FlowNIB probe described by ``cfg`` into ``run_dir``; returns the results dict.

    ``lock``: the run directory's lock, held by the caller (``cmiexp.jobs.run_job``); the probe
    claims the directory through it once its inputs are checked. A run directory whose results.json
    says completed is returned as is, like a finished training run (``trainer.resume=false`` refuses
    a directory that already holds a run)."""
    from cmiexp.data import load_task
    from cmiexp.data.tokenize import tokenize_split
    from cmiexp.models.factory import default_cache_dir
    from cmiexp.probes.flownib import (compare_runs, extract_activations, summary_line, train_flownib,
                                       write_outputs)
    from cmiexp.train.environment import peak_memory_mb, quiet_libraries
    from cmiexp.runs import read_results, write_results

    run_dir = Path(run_dir)
    refuse_distributed()
    resume = str(cfg.trainer.resume).lower()
    prior = read_results(run_dir)
    if prior and prior.get("status") == "completed" and resume != "false":
        log.info("probe already completed: %s (delete that directory to recompute it)", run_dir)
        return prior
    if prior and resume == "false":
        raise ConfigError(f"run directory {run_dir} already holds a run and trainer.resume=false; remove it or "
                          "use trainer.resume=auto")
    s, source, compare = check_probe_inputs(cfg)  # checked before the expensive part
    device = resolve_device(s["device"])
    quiet_libraries()
    t_start = time.perf_counter()

    run_dir.mkdir(parents=True, exist_ok=True)
    results = _base_results(cfg, run_dir, source)
    if lock is not None:
        lock.claim()  # a failure from here on is recorded in this results.json
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_results(run_dir, results)

    cache_dir = default_cache_dir(cfg.paths)
    task = load_task(cfg.task)
    results["task_type"] = "regression" if task.is_regression else "classification"
    ds = _probe_split(task, s["split"])
    rows = select_rows(ds["label"][:], task.is_regression, s["max_samples"], s["subsample_seed"])
    if rows.size < 4:
        raise DataError(f"task={task.name} split {s['split']!r} has {rows.size} labelled rows; the probe needs "
                        "at least 4 (choose another objective.split)")
    ds = ds.select(rows.tolist())
    model, tokenizer, suffix, head, family, max_len = _load_model(cfg, source, task, cache_dir)
    pooling, positions = head_pooling(s["pooling"], head, family, getattr(tokenizer, "mask_token_id", None))
    tokenized = tokenize_split(ds, task, tokenizer, max_len, cache_dir, f"probe-{s['split']}", suffix=suffix)
    loader = _loader(tokenized, tokenizer, model, int(cfg.trainer.eval_batch_size))

    t0 = time.perf_counter()
    act = extract_activations(model, loader, pooling=pooling, device=device, head_positions=positions,
                              progress=bool(cfg.trainer.progress_bar))
    extract_s = time.perf_counter() - t0
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info("cached X %s and Z %s from %d %s rows in %.1f s; training the critics of %d layers on %s",
             tuple(act["x"].shape), tuple(act["z"].shape), rows.size, s["split"], extract_s, act["z"].shape[0], device)

    num_classes = None if task.is_regression else int(task.num_labels)
    progress = bool(cfg.trainer.progress_bar)
    if s["compat"] == "reference":
        from cmiexp.probes.flownib.reference import train_flownib_reference

        result = train_flownib_reference(
            act["x"], act["z"], act["y"], num_classes, steps=s["steps"], delta=s["delta"], seed=int(cfg.seed),
            lr=s["lr"], device=device, progress=progress)
    else:
        result = train_flownib(
            act["x"], act["z"], act["y"], num_classes, steps=s["steps"], batch_size=s["batch_size"],
            delta=s["delta"], estimator=s["estimator"], heldout_fraction=s["heldout_fraction"],
            test_fraction=s["test_fraction"], seed=int(cfg.seed), hidden=s["hidden"], lr=s["lr"], device=device,
            critic=s["critic"], tau=s["tau"], record_every=s["record_every"], select_every=s["select_every"],
            noise_std=s["noise_std"], weight_decay=s["weight_decay"], progress=progress)
    probe_info = {"task": task.name, "model": cfg.model.name, "split": s["split"], "num_samples": int(rows.size),
                  "pooling": s["pooling"], "pooling_used": pooling, "head": head, "family": family,
                  "max_length": max_len, "source": source.describe(), "extract_time_s": extract_s}
    result.config["probe"] = probe_info
    files = {k: p.name for k, p in write_outputs(result, run_dir).items()}
    # the probe checks its own numbers against the bounds of MI and says so loudly
    log.info("%s", summary_line(result))
    for f in result.flags:
        log.warning("FlowNIB estimation failure: %s", f["message"])
    if result.flags:
        log.warning("FlowNIB: %d estimate(s) violate a bound of mutual information; they are estimation failures, "
                    "not findings (see 'flags' in %s)", len(result.flags), run_dir / "flownib.json")
    if compare:
        mine = compare_label(results, "this run")
        labels = _unique([mine] + [lab for lab, _, _ in compare])
        for lab, d, res in compare:
            other = (res or {}).get("task") or (d.get("config", {}).get("probe") or {}).get("task")
            if other and other != task.name:
                log.warning("objective.compare: %s is a probe of task=%s, this run of task=%s", lab, other, task.name)
        runs = {labels[0]: result, **{lab: d for lab, (_, d, _) in zip(labels[1:], compare)}}
        files.update({f"compare_{k}": p.name for k, p in compare_runs(runs, run_dir).items()})

    metrics = {**summary_metrics(result), "num_samples": int(rows.size), "flagged_estimates": len(result.flags)}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise DataError(f"FlowNIB probe: {k} is not finite ({v}); lower objective.lr or use objective.estimator=smile")
    steps_done = int(result.steps[-1]) + 1
    results.update(
        status="completed",
        best={"step": steps_done, "epoch": None, "metrics": metrics},
        final={"step": steps_done, "epoch": None, "metrics": metrics},
        global_step=steps_done,
        wall_time_s=time.perf_counter() - t_start,
        extract_time_s=extract_s,
        probe_time_s=float(result.wall_time_s),
        device=device,
        peak_memory_mb=peak_memory_mb(torch.device(device)),
        num_probe_samples=int(rows.size),
        probe={k: v for k, v in result.config.items() if k != "probe"} | {"split": s["split"], "pooling": s["pooling"]},
        files=files,
        probe_ok=result.ok,
        probe_flags=[dict(f) for f in result.flags],
    )
    write_results(run_dir, results)
    return results


__all__ = ["PRIMARY_METRIC", "head_pooling", "resolve_device", "run_probe", "select_rows", "summary_metrics"]
