"""Where the Hydra configs live and the custom resolvers they use."""

from __future__ import annotations

import hashlib
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


def run_suffix(override_dirname: str) -> str:
    """A short, stable hash of the overrides that are not already in the run path ("" if none)."""
    if not override_dirname:
        return ""
    return "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cmiexp_suffix"):
        OmegaConf.register_new_resolver("cmiexp_suffix", run_suffix)


register_resolvers()
