"""Experiment trackers. Local files are always written by the runner; W&B is optional.

W&B must never prompt or hang: ``mode=auto`` goes online only when an API key is already
configured (env or netrc), otherwise offline; a failed online start falls back to offline.
"""

from __future__ import annotations

import logging
import netrc
import os

log = logging.getLogger(__name__)

_SECRET_HINTS = ("api_key", "apikey", "token", "password", "secret")


def scrub_secrets(obj):
    """Drop values whose key looks like a credential (configs go to W&B and to disk)."""
    if isinstance(obj, dict):
        return {k: ("***" if any(h in str(k).lower() for h in _SECRET_HINTS) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass

    def result_fields(self) -> dict:
        return {}


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker:
    def __init__(self, logger_cfg, config_dict: dict, run_dir, run_id: str):
        import wandb

        mode = str(logger_cfg.mode)
        if mode == "auto":
            mode = "online" if wandb_has_credentials() else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(
            project=logger_cfg.get("project"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            name=logger_cfg.get("run_name"),
            tags=list(logger_cfg.get("tags") or []),
            config=scrub_secrets(config_dict),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
        )
        self._wandb = wandb
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, console="off"), **kwargs)
        except Exception as e:  # noqa: BLE001 - network or auth trouble must not kill a training run
            if mode != "online":
                raise
            log.warning("W&B online start failed (%s); logging offline to %s (sync later with `wandb sync`)", e, run_dir)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(console="off"), **kwargs)
        self.mode = mode

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()

    def result_fields(self) -> dict:
        """Where this run's W&B data is, for results.json and the end-of-run summary: the offline
        run folder ``wandb sync`` takes (offline mode) or the run's page (online)."""
        offline = bool(getattr(self.run, "offline", self.mode != "online"))
        info = {"mode": "offline" if offline else "online"}
        if offline:
            info["sync_dir"] = str(self.run.settings.sync_dir)
        else:
            info["url"] = self.run.url
        return {"wandb": info}


def make_tracker(cfg, config_dict: dict, run_dir, run_id: str, is_main_process: bool):
    name = cfg.logger.name
    if not is_main_process or name == "local" or cfg.logger.get("mode") == "disabled":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(cfg.logger, config_dict, run_dir, run_id)
    from cmiexp.errors import ConfigError

    raise ConfigError(f"unknown logger.name={name!r}; valid choices: local, wandb")
