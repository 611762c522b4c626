"""Checkpoints: ``checkpoint/latest`` (full training state, for resume) and ``checkpoint/best``
(``save_pretrained`` model + tokenizer, for teachers, probes and users).

Both are written to a temporary folder and renamed into place, so a crash or kill during a
save leaves the previous checkpoint intact. Nothing here unpickles arbitrary objects:
weights are safetensors and Accelerate loads its state files with ``weights_only=True``.
"""

from __future__ import annotations

import json
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


def save_training_state(accelerator, run_dir: Path, state: TrainerState, objective) -> None:
    """Save model, optimizer, scheduler, RNG states, counters and objective state atomically.

    Every process must call this (Accelerate saves per-process RNG states)."""
    from safetensors.torch import save_file

    final = latest_dir(run_dir)
    tmp = final.parent / f".{LATEST}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        obj_state = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
        save_file(obj_state, str(tmp / OBJECTIVE_STATE))
        # The state file is written last: its presence marks a complete checkpoint.
        atomic_write_json(tmp / TRAINER_STATE, asdict(state))
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def load_training_state(accelerator, run_dir: Path, objective, task_name: str, num_labels: int,
                        model_name: str | None = None) -> TrainerState:
    from safetensors.torch import load_file

    d = latest_dir(run_dir)
    state = TrainerState.from_file(d / TRAINER_STATE)
    if model_name and state.model and state.model != model_name:
        raise CheckpointError(f"checkpoint {d} was trained with model={state.model}, not model={model_name}; "
                              "use another run directory")
    if state.task and (state.task != task_name or state.num_labels != num_labels):
        raise CheckpointError(
            f"checkpoint {d} is for task={state.task} ({state.num_labels} labels), not task={task_name} "
            f"({num_labels} labels); use another run directory"
        )
    try:
        accelerator.load_state(str(d))
    except Exception as e:  # noqa: BLE001 - any failure here means the checkpoint does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {d}: {first[:300]}") from e
    obj_file = d / OBJECTIVE_STATE
    if obj_file.exists():
        objective.load_state_dict(load_file(str(obj_file)))
    return state


def save_best(accelerator, model, tokenizer, run_dir: Path, info: dict) -> None:
    """Export the current model as ``checkpoint/best`` (config, safetensors weights, tokenizer)."""
    final = Path(run_dir) / "checkpoint" / BEST
    tmp = final.parent / f".{BEST}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "best_info.json", info)
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()
