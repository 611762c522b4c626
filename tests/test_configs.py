"""Every YAML under conf/ must compose through Hydra (a new config that does not compose fails CI)."""

from __future__ import annotations


import pytest
from omegaconf import OmegaConf

from cmiexp.config import CONF_DIR
from tests.conftest import compose_config

GROUPS = ["model", "task", "objective", "trainer", "logger", "paths", "experiment", "head", "peft"]


def _options(group: str) -> list[str]:
    root = CONF_DIR / group
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options():
    for g in ["model", "task", "objective", "trainer", "logger", "paths"]:
        assert _options(g), f"config group {g}/ is empty"


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_config_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    # Everything outside hydra.* must resolve (interpolations, env defaults).
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("task", "model", "objective", "trainer", "logger", "paths"):
        assert key in container, f"{group}={option} lost the {key} group"
    assert container["task"]["name"] and container["model"]["name"] and container["objective"]["name"]
    if group == "experiment":
        assert container["experiment_name"] != "default", f"experiment={option} must set experiment_name"


def test_every_yaml_is_commented():
    for path in CONF_DIR.rglob("*.yaml"):
        text = path.read_text()
        assert "#" in text, f"{path.relative_to(CONF_DIR)} has no comment explaining it"


def _run_dir(args, env) -> str:
    from tests.conftest import run_cli

    out = run_cli([*args, "--cfg", "all", "--resolve", "-p", "hydra.run.dir"], env).stdout.strip()
    return out.splitlines()[-1].strip()


def test_run_dir_is_deterministic_and_hashes_the_config(cmiexp_env):
    from cmiexp.runs import config_hash

    out = cmiexp_env["CMIEXP_OUTPUT_DIR"]
    base = _run_dir(["task=glue/rte", "seed=3"], cmiexp_env)
    assert base == f"{out}/runs/default/glue/rte/tiny-bert/ce/seed3-" + config_hash(compose_config(["task=glue/rte", "seed=3"]))
    # Same command, same directory: that is what makes re-running a command resume it.
    assert _run_dir(["seed=3", "task=glue/rte", "trainer.resume=auto", "trainer.stop_after_steps=5"], cmiexp_env) == base
    lr = _run_dir(["task=glue/rte", "seed=3", "trainer.lr=3e-5"], cmiexp_env)
    assert lr == f"{out}/runs/default/glue/rte/tiny-bert/ce/seed3-" + config_hash(
        compose_config(["task=glue/rte", "seed=3", "trainer.lr=3e-5"]))
    assert lr != base


def test_help_lists_groups_and_options(cmiexp_env):
    from tests.conftest import run_cli

    out = run_cli(["--help"], cmiexp_env).stdout
    assert "Config groups" in out
    for g in ("model:", "objective:", "task/glue:", "trainer:", "logger:"):
        assert g in out
    assert "tiny-bert" in out and "rte" in out


COMMON_TASK_KEYS = ("name", "loader", "data_dir", "max_train_samples", "max_eval_samples", "max_length")


def test_every_task_config_shares_the_common_keys():
    """A sweep over tasks composes the default task first; task.* overrides must fit every task."""
    from cmiexp.cli import group_options

    for option in group_options("task"):
        task = compose_config([f"task={option}"]).task
        missing = [k for k in COMMON_TASK_KEYS if k not in task]
        assert not missing, f"task={option} lacks {missing}"
