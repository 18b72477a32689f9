"""A job's identity: its run dir, and the namespace of its topics recorded there.

Each job has topics of its own, so a new job never trains on another job's history, never joins
its filter group and never reads its policy versions. kafka.namespace names them when set; left
unset, a job gets `tba-<run dir name>-<random>` when it first starts, and `<run_dir>/config.yaml`
(the resolved config every role of the job reads) keeps it for every later command on that run dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from ops.config import TbaConfig, with_overrides
from ops.errors import ConfigError, TbaError


def recorded_namespace(run_dir: str | Path) -> str | None:
    """The namespace of the job in run_dir, or None when no job has started there."""
    path = Path(run_dir) / "config.yaml"
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("kafka", {}).get("namespace")
    except (OSError, yaml.YAMLError):
        return None


def for_job(cfg: TbaConfig, create: bool = False) -> TbaConfig:
    """cfg with kafka.namespace resolved: as set, else the job's in trainer.run_dir, else (create) a new one.

    create: this command starts the job (`tba run`, `tba train`, `tba topics create`); a namespace made
    here is recorded at once in run_dir/config.yaml (the job's resolved config).
    """
    run_dir = Path(cfg.trainer.run_dir)
    namespace = cfg.kafka.namespace or recorded_namespace(run_dir)
    if namespace is None and not create:
        raise ConfigError(
            f"kafka.namespace: not set, and trainer.run_dir {run_dir} holds no job yet: start one there "
            "(`tba run`, `tba train`, `tba topics create`) or set kafka.namespace"
        )
    if namespace is not None:
        return with_overrides(cfg, kafka={"namespace": namespace})
    name = re.sub(r"[^A-Za-z0-9_\-]+", "-", run_dir.resolve().name).strip("-") or "run"
    made = with_overrides(cfg, kafka={"namespace": f"tba-{name}-{uuid.uuid4().hex[:8]}"})
    # recorded at once, and only once: of processes starting together (torchrun's), one records its
    # namespace and every other takes that one
    if write_config(made, exclusive=True):
        return made
    return with_overrides(cfg, kafka={"namespace": recorded_namespace(run_dir)})


DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def model_id(cfg: TbaConfig) -> str:
    """The name of the policy a job trains, carried by its groups: its model folder's name (or the default's)."""
    path = cfg.trainer.model or cfg.searcher.model
    return Path(path).name if path else DEFAULT_MODEL_ID


def write_config(cfg: TbaConfig, exclusive: bool = False) -> bool:
    """The resolved config as <run_dir>/config.yaml, written whole or not at all.

    exclusive: only if there is none yet (False when another process recorded one first)."""
    path = Path(cfg.trainer.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config-{uuid.uuid4().hex}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    try:
        if not exclusive:
            tmp.replace(path)
            return True
        try:
            os.link(tmp, path)  # atomic, and fails if the file exists
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold run_dir for one job (an flock on run_dir/.lock, gone with the process however it ends): a
    second `tba run` there fails at once instead of sharing its checkpoints, logs and job.json."""
    path = Path(run_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise TbaError(
                f"run dir {path} is in use by another `tba run` (pid {lock.read().strip() or '?'}): "
                "stop that one first, or give this job its own trainer.run_dir"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
