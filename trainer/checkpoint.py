"""Checkpoints: everything a resume needs, written atomically under <run_dir>/checkpoints/step-NNNNNN.

A checkpoint holds the weights (safetensors, loadable by from_pretrained; the adapters alone under
LoRA), the optimizer, scheduler and RNG, the step and policy version, and the replay buffer's index
with the curated offsets it had ingested; `latest` names the newest. A restarted trainer resumes to
the same next step.

Each checkpoint also records what it was made with (settings.json: the config and, for a replay,
its range), and `check_resume` owns the one rule every command that trains follows (`tba run`,
`tba train`, `tba replay`): a run dir holding a checkpoint resumes only the job that wrote it.
torch is imported where weights are read or written, not here, so that the supervisor can check a
run dir without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from ops.config import TbaConfig
from ops.errors import TbaError

log = logging.getLogger(__name__)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """run_dir's newest checkpoint folder (checkpoints/step-NNNNNN), or None."""
    latest = run_dir / "checkpoints" / "latest"
    return latest.parent / latest.read_text().strip() if latest.exists() else None


def checkpoint_at(path: str | Path) -> Path:
    """A checkpoint folder named directly, or the newest of a run dir; a clear error if neither."""
    path = Path(path)
    if (path / "model").is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise TbaError(f"{path} is neither a checkpoint (<run_dir>/checkpoints/step-N) nor a run dir holding one")
    return found


# What a job's checkpoint was made with: resuming it under other values would mix them silently (the
# optimizer brings its old lr back, the buffer's offsets belong to the old topics, its groups to the old task)
RESUME_FIELDS = (
    "kafka.namespace", "task", "buffer.samples_per_prompt", "searcher.model", "searcher.gguf_file",
    "searcher.reference_model", "trainer.model", "trainer.gguf_file", "trainer.mode", "trainer.loss",
    "trainer.lora_r", "trainer.lora_alpha", "trainer.lora_targets", "trainer.lr", "trainer.weight_decay",
    "trainer.warmup_steps",
)  # fmt: skip


def changed_for_resume(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for each RESUME_FIELDS value (a whole section: each of its fields) that differs."""
    changes = []
    for entry in RESUME_FIELDS:
        section, _, name = entry.partition(".")
        names = [name] if name else sorted(set(old.get(section, {})) | set(new.get(section, {})))
        for n in names:
            before, after = old.get(section, {}).get(n), new.get(section, {}).get(n)
            if before != after:
                changes.append(f"{section}.{n}: {before!r} -> {after!r}")
    return changes


def made_with(path: Path) -> dict | None:
    """What the checkpoint at path records it was made with: {"config": ..., "replay": ...}, if known.

    Checkpoints written before settings.json existed: the run dir's config.yaml, as `tba run` wrote it."""
    settings = path / "settings.json"
    if settings.exists():
        return json.loads(settings.read_text())
    config = path.parent.parent / "config.yaml"
    return {"config": yaml.safe_load(config.read_text()), "replay": None} if config.exists() else None


def check_resume(cfg: TbaConfig, replay: dict | None = None) -> None:
    """Refuse to resume a checkpoint of trainer.run_dir made by another job (other settings, or another
    replay, or a replay's checkpoint for a job that is none), naming what differs. replay: this job's range."""
    run_dir = Path(cfg.trainer.run_dir)
    path = latest_checkpoint(run_dir)
    old = made_with(path) if path is not None else None
    if old is None:
        return
    if replay is not None and old.get("replay") != replay:
        raise TbaError(
            f"trainer.run_dir {run_dir} holds a checkpoint of another job; a replay trains a new policy in a run dir "
            f"of its own (e.g. TBA__TRAINER__RUN_DIR=.tba/replay; --init to start from that checkpoint)"
        )
    changes = changed_for_resume(old.get("config") or {}, cfg.model_dump(mode="json"))
    if replay is None and old.get("replay") is not None:
        changes.insert(0, f"replay: {old['replay']!r} -> None")
    if changes:
        raise TbaError(
            f"{run_dir} holds a checkpoint of a job with other settings ({'; '.join(changes)}): run it "
            f"with its own settings to resume it, or give this job a trainer.run_dir of its own"
        )


def save(trainer) -> Path:
    """Write a checkpoint under run_dir/checkpoints/step-NNNNNN (atomically) and point `latest` at it."""
    import numpy as np
    import torch

    root = Path(trainer.t.run_dir) / "checkpoints"
    final = root / f"step-{trainer.step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainer.model.save_pretrained(tmp / "model", safe_serialization=True)
    settings = {"config": trainer.cfg.model_dump(mode="json"), "replay": trainer.replay}
    (tmp / "settings.json").write_text(json.dumps(settings, indent=1))
    torch.save(
        {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": trainer.step,
            "policy_version": trainer.policy_version,
        },
        tmp / "trainer.pt",
    )
    if trainer.buffer is not None:
        np.savez(tmp / "buffer.npz", **trainer.buffer.state())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(final.name)
    os.replace(root / "latest.tmp", root / "latest")
    prune(root, trainer.t.keep_checkpoints, trainer.t.keep_checkpoint_steps, latest=final.name)
    return final


def prune(root: Path, keep: int, steps: list[int], latest: str) -> list[Path]:
    """Remove all but the newest `keep` checkpoints, those of `steps` and `latest` (the one just written, which a
    stray higher-numbered folder of an interrupted save must not push out); returns what was removed. Each holds
    the buffer's index, which grows with the history: kept forever they would fill a week-long job's disk."""
    found = sorted(root.glob("step-[0-9]*"), key=lambda p: int(p.name.removeprefix("step-")))
    named = {f"step-{s:06d}" for s in steps} | {latest}
    removed = [p for p in found[: max(0, len(found) - keep)] if p.name not in named]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_weights(trainer, path: Path) -> None:
    """The weights of the checkpoint at path (the adapters alone under LoRA), none of its other state."""
    from safetensors.torch import load_file

    weights = load_file(next((path / "model").glob("*.safetensors")))
    if trainer.t.lora_r:  # save_pretrained of a peft model writes the adapters alone, in peft's naming
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, weights)
    else:
        missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise TbaError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")


def resume(trainer) -> bool:
    """Load the latest checkpoint of run_dir, if there is one; True if resumed."""
    import numpy as np
    import torch

    path = latest_checkpoint(Path(trainer.t.run_dir))
    if path is None:
        return False
    load_weights(trainer, path)
    state = torch.load(path / "trainer.pt", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    trainer.step, trainer.policy_version = state["step"], state["policy_version"]
    if trainer.buffer is not None:
        with np.load(path / "buffer.npz", allow_pickle=True) as saved:
            trainer.buffer.restore({k: saved[k] for k in saved.files})
    if trainer.feed is not None:
        trainer.feed.seek(trainer.buffer.next_offsets)
    log.info("resumed from %s at step %d, policy version %d", path, trainer.step, trainer.policy_version)
    return True
