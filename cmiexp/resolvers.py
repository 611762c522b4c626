"""The custom OmegaConf resolvers the configs use, registered by the entry points (``cmiexp``,
``python -m cmiexp.objectives.kd``, ``cmiexp --dry-run``) before Hydra resolves a run directory.

It sits above the modules it draws on (run identity, KD teachers), so that none of them has to
import it back: registering is the job of whoever starts a run."""

from __future__ import annotations

from omegaconf import OmegaConf


def teacher_tag(*, _root_) -> str:
    """``${cmiexp_teacher_tag:}``: empty unless the run is a KD student. Only a KD student imports
    the teacher machinery (and with it torch), so ``cmiexp --help`` and ``--cfg`` of every other
    run start in about a second instead of paying for torch and transformers."""
    objective = _root_.get("objective") or {}
    if objective.get("name") != "kd":
        return ""
    from cmiexp.objectives.kd.teacher import student_teacher_tag

    return student_teacher_tag(_root_)


def register_resolvers() -> None:
    """Register ``${cmiexp_run_id:}`` and ``${cmiexp_teacher_tag:}`` (idempotent)."""
    from cmiexp.runs.identity import run_id_resolver

    # ${cmiexp_run_id:} in hydra.run.dir: the hash of the job's resolved training config.
    if not OmegaConf.has_resolver("cmiexp_run_id"):
        OmegaConf.register_new_resolver("cmiexp_run_id", run_id_resolver)
    # ${cmiexp_teacher_tag:} after it: "-from-<teacher objective>-<hash8>" for a KD student, "" otherwise.
    if not OmegaConf.has_resolver("cmiexp_teacher_tag"):
        OmegaConf.register_new_resolver("cmiexp_teacher_tag", teacher_tag)


__all__ = ["register_resolvers", "teacher_tag"]
