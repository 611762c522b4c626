"""Checkpoints: ``checkpoint/latest`` (full training state, for resume) and ``checkpoint/best``
(``save_pretrained`` model + tokenizer, for teachers, probes and users).

Both are written to a temporary folder and renamed into place, so a crash or kill during a
save leaves the previous checkpoint intact. Nothing here unpickles arbitrary objects:
weights are safetensors and Accelerate loads its state files with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmiexp.errors import CheckpointError
from cmiexp.io import atomic_replace_dir, atomic_write_json

LATEST = "latest"
BEST = "best"
TRAINER_STATE = "trainer_state.json"
OBJECTIVE_STATE = "objective_state.safetensors"


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    train_time_s: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)
    task: str = ""
    model: str = ""
    num_labels: int = 0

    @classmethod
    def from_file(cls, path: Path) -> "TrainerState":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"corrupt checkpoint state {path}: {e}; delete the checkpoint folder to start over") from e
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def latest_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint" / LATEST


def has_checkpoint(run_dir: Path) -> bool:
    return (latest_dir(run_dir) / TRAINER_STATE).exists()


def save_training_state(accelerator, run_dir: Path, state: TrainerState, objective,
                        run_config: dict | None = None) -> None:
    """Save model, optimizer, scheduler, RNG states, counters and objective state atomically.

    ``run_config`` (the run's identity record) is stored with it, so a resume can check that it
    continues the same training. Every process must call this (Accelerate saves per-process RNG
    states)."""
    from safetensors.torch import save_file

    from cmiexp.runs import write_run_config

    final = latest_dir(run_dir)
    tmp = final.parent / f".{LATEST}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        obj_state = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
        save_file(obj_state, str(tmp / OBJECTIVE_STATE))
        if run_config is not None:
            write_run_config(tmp, run_config)
        # The state file is written last: its presence marks a complete checkpoint.
        atomic_write_json(tmp / TRAINER_STATE, asdict(state))
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def load_training_state(accelerator, run_dir: Path, objective, task_name: str, num_labels: int,
                        model_name: str | None = None) -> TrainerState:
    from safetensors.torch import load_file

    d = latest_dir(run_dir)
    if (d / "retention.json").is_file():
        raise CheckpointError(f"checkpoint {d} was trimmed when its run completed (trainer.checkpoint_retention); "
                              "it holds weights only and cannot be resumed; use another run directory")
    state = TrainerState.from_file(d / TRAINER_STATE)
    if model_name and state.model and state.model != model_name:
        raise CheckpointError(f"checkpoint {d} was trained with model={state.model}, not model={model_name}; "
                              "use another run directory")
    if state.task and (state.task != task_name or state.num_labels != num_labels):
        raise CheckpointError(
            f"checkpoint {d} is for task={state.task} ({state.num_labels} labels), not task={task_name} "
            f"({num_labels} labels); use another run directory"
        )
    _check_random_states(d, accelerator.process_index)
    try:
        accelerator.load_state(str(d))
    except Exception as e:  # noqa: BLE001 - any failure here means the checkpoint does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {d}: {first[:300]}") from e
    obj_file = d / OBJECTIVE_STATE
    if obj_file.exists():
        objective.load_state_dict(load_file(str(obj_file)))
    return state


RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def _check_random_states(d: Path, process_index: int) -> None:
    """Accelerate skips an unloadable RNG file with an info line and resumes with other random
    numbers (different dropout masks, different metrics); here that is an error."""
    from accelerate.utils import load

    f = d / f"random_states_{process_index}.pkl"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {d} lacks {f.name} (the random states of process {process_index}); "
                              "it was saved with another number of processes or is incomplete")
    try:
        states = load(str(f))  # weights_only=True: nothing arbitrary is unpickled
        missing = [k for k in RNG_KEYS if k not in states]
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"cannot load random states {f}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}; "
                              "delete the checkpoint folder to start over") from None
    if missing:
        raise CheckpointError(f"random states {f} lack {', '.join(missing)}; delete the checkpoint folder to start over")


def _step_of(d: Path) -> int | None:
    try:
        return int(json.loads((d / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_latest(run_dir: Path) -> str | None:
    """Finish a checkpoint swap that a crash interrupted; returns a sentence saying what was resumed.

    ``atomic_replace_dir`` moves ``latest`` to ``latest.old`` and then ``.latest.tmp`` to
    ``latest``. A complete folder is one with its trainer_state.json (written last). Whatever the
    crash point, the newest complete one of the three becomes ``latest``; the others are removed."""
    final = latest_dir(run_dir)
    tmp, old = final.parent / f".{LATEST}.tmp", final.with_name(final.name + ".old")
    candidates = [(p, _step_of(p)) for p in (final, tmp, old) if p.is_dir()]
    complete = [(p, s) for p, s in candidates if s is not None]
    if final.is_dir() and _step_of(final) is not None and not old.exists():
        return None  # the normal state (a stale .tmp is a save that never completed; save removes it)
    if not complete:
        return None
    best, step = max(complete, key=lambda c: (c[1], c[0] == final))
    if best != final:
        if final.exists():
            shutil.rmtree(final)
        os.replace(best, final)
    for p in (tmp, old):
        if p.exists() and p != best:
            shutil.rmtree(p, ignore_errors=True)
    return (f"recovered from an interrupted checkpoint save: resuming from the checkpoint of step {step} "
            f"(was {best.relative_to(run_dir)})")


# What each trainer.checkpoint_retention keeps of checkpoint/latest once a run has completed.
def apply_retention(run_dir: Path, retention: str) -> None:
    """``full``: everything (optimizer state included); ``weights``: the model weights, counters
    and objective state (no optimizer, scheduler or RNG state, about 2/3 of the size with Adam);
    ``none``: no checkpoint/latest at all (checkpoint/best stays)."""
    d = latest_dir(run_dir)
    if retention == "full" or not d.is_dir():
        return
    if retention == "none":
        shutil.rmtree(d)
        return
    for f in d.iterdir():
        if f.is_file() and (f.name.startswith(("optimizer", "scheduler", "random_states", "scaler"))):
            f.unlink()
    atomic_write_json(d / "retention.json", {"retention": retention, "resumable": False})


def save_best(accelerator, model, tokenizer, run_dir: Path, info: dict) -> None:
    """Export the current model as ``checkpoint/best`` (config, safetensors weights, tokenizer)."""
    from cmiexp.train.distributed import uses_fsdp

    final = Path(run_dir) / "checkpoint" / BEST
    tmp = final.parent / f".{BEST}.tmp"
    accelerator.wait_for_everyone()
    # Under FSDP each process holds a shard: gathering the full state dict (onto rank 0's CPU,
    # FULL_STATE_DICT) is a collective every process joins; the weights then go out as safetensors.
    full_state = accelerator.get_state_dict(model) if uses_fsdp(accelerator) else None
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(tmp), safe_serialization=True, state_dict=full_state)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "best_info.json", info)
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()
