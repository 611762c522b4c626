"""Where the Hydra configs live and the custom resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def find_conf_dir() -> Path:
    """The top-level ``conf/`` in a source checkout; ``cmiexp/conf`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").exists():
            return cand
    raise FileNotFoundError(f"cmiexp configs not found next to {here}")


CONF_DIR = find_conf_dir()


def register_resolvers() -> None:
    # ${cmiexp_run_id:} in hydra.run.dir: the hash of the job's resolved training config.
    from cmiexp.runs.identity import run_id_resolver

    if not OmegaConf.has_resolver("cmiexp_run_id"):
        OmegaConf.register_new_resolver("cmiexp_run_id", run_id_resolver)
    # ${cmiexp_teacher_tag:} after it: "-from-<teacher objective>-<hash8>" for a KD student, "" otherwise.
    if not OmegaConf.has_resolver("cmiexp_teacher_tag"):
        OmegaConf.register_new_resolver("cmiexp_teacher_tag", _teacher_tag)


def _teacher_tag(*, _root_) -> str:
    # Imported when first used: the KD package loads torch, which resolving other runs' names does not need.
    from cmiexp.objectives.kd.teacher import teacher_tag_resolver

    return teacher_tag_resolver(_root_=_root_)


register_resolvers()
