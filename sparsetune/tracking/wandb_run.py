"""W&B logging on the main process: mode resolution (auto = online with an API key, else offline)."""

from __future__ import annotations

import os
from pathlib import Path

from sparsetune.recipe.schema import WandbSection


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_mode(mode: str) -> tuple[str, str | None]:
    """(effective mode, notice for the user or None). WANDB_MODE in the environment wins over 'auto'."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if env in ("online", "offline", "disabled"):
            return env, None
        if env == "dryrun":
            return "offline", None
        if _has_api_key():
            return "online", None
        return "offline", ("wandb: no API key found (WANDB_API_KEY or `wandb login`), logging offline; "
                           "sync later with `wandb sync <output_dir>/wandb/offline-run-*`")
    return mode, None


class WandbRun:
    """Thin wrapper so the trainer logs the same way whether W&B is on or off."""

    def __init__(self, cfg: WandbSection, run_dir: Path, config: dict, run_id: str | None = None):
        self.mode, notice = resolve_mode(cfg.mode)
        if notice:
            print(notice, flush=True)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, tags=cfg.tags or None,
            config=config, dir=str(run_dir), mode=self.mode, id=run_id, resume="allow" if run_id else None,
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
