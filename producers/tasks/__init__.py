"""Tasks: where prompts come from and how completions are rewarded; one module per task, chosen in config."""

from __future__ import annotations

from ops.config import TaskConfig
from ops.errors import ConfigError


def build_task(cfg: TaskConfig):
    """The task named by task.name."""
    if cfg.name == "math":
        from producers.tasks.math import MathTask

        return MathTask(cfg)
    if cfg.name == "toy":
        from producers.tasks.toy import ToyTask

        return ToyTask(cfg)
    raise ConfigError(f"task.name: {cfg.name!r} is not built yet (available: 'math', 'toy')")
