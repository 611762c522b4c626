"""Where the Hydra configs live (the resolvers they use are registered by ``cmiexp.resolvers``)."""

from __future__ import annotations

from pathlib import Path


def find_conf_dir() -> Path:
    """The top-level ``conf/`` in a source checkout; ``cmiexp/conf`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").exists():
            return cand
    raise FileNotFoundError(f"cmiexp configs not found next to {here}")


CONF_DIR = find_conf_dir()
