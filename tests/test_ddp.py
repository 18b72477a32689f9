"""Data parallel: 2 gloo processes, each on half the prompts, make the same update as one process on all."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ops.broker import free_port
from ops.config import load_config, with_overrides
from producers.synthetic import synthetic_group
from tests.tiny_models import saved_tiny_llama, tiny_llama
from trainer.replay_buffer import SampledPrompt
from trainer.train import Trainer

pytestmark = pytest.mark.slow  # gloo processes


def batch() -> list[SampledPrompt]:
    rng = np.random.default_rng(0)
    groups = [synthetic_group(rng, i, samples=4, tokens=12, vocab=128) for i in range(4)]
    return [SampledPrompt(g.prompt_id, g.prompt, g.prompt_token_ids, g.samples, [0] * 4, True) for g in groups]


def config():
    return load_config(environ={}, trainer={"prompts_per_step": 4, "micro_batch_prompts": 1, "lr": 1e-3, "lora_r": 0})


def one_step() -> dict[str, torch.Tensor]:
    trainer = Trainer(config(), tiny_llama(0), None, pad_id=0)
    result = trainer.train_step(batch())
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, result.loss


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    state, loss = one_step()
    torch.save({"state": state, "loss": loss}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_processes_make_the_single_process_update(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single, single_loss = one_step()
    before = tiny_llama(0).state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"ddp.{rank}")
        assert abs(got["loss"] - single_loss) < 1e-4 * max(1.0, abs(single_loss))
        for name, tensor in single.items():
            assert not torch.equal(tensor, before[name]) or name.endswith("norm.weight")
            torch.testing.assert_close(got["state"][name], tensor, rtol=1e-5, atol=1e-6)


def test_tba_train_under_torchrun_with_two_processes(cfg, tmp_path):
    """The training job itself, data-parallel: 2 gloo processes, synchronous mode on the toy task."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        cfg,
        task={"name": "toy", "train_size": 8, "eval_size": 2},
        searcher={"model": str(tmp_path / "model"), "max_new_tokens": 4},
        buffer={"samples_per_prompt": 3},
        trainer={"mode": "sync", "lora_r": 0, "prompts_per_step": 4, "micro_batch_prompts": 1, "max_steps": 3,
                 "eval_prompts": 2, "eval_max_new_tokens": 4, "run_dir": str(tmp_path / "run")},
    )  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "tba.cli",
         "--config", str(tmp_path / "job.yaml"), "train"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trainer stopped at step 3") == 2  # both processes took every step
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in rows) == 3  # recorded once, by process 0
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "model" / "model.safetensors").exists()
