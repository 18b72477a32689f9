"""A job fed only through the gateway, shared by tests/test_gateway_job.py and bench/gateway.py: `tba run` with
the gateway instead of searchers, on a tiny model and the toy task, and agents (examples/gateway_agent.py)
calling it with the official `openai` client from threads of this process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import yaml

from ops.broker import free_port, job_broker
from ops.config import TbaConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gateway_agent import agent_round  # noqa: E402

TOKEN = "gateway-job-token"


def job_config(
    root: Path, model: str, budget_s: float, searchers: int = 0, filters: int = 1, checkpoint_every: int = 1_000_000
) -> TbaConfig:
    """The gateway alone feeds it unless `searchers` says otherwise (bench/soak.py runs every role)."""
    port = free_port()
    return load_config(
        environ={},
        kafka={"bootstrap": f"127.0.0.1:{port}", "namespace": "gateway", "client_timeout_s": 15},
        broker={"port": port, "data_dir": str(root / "kafka"), "heap": "768m"},
        topics={"partitions": 2},
        task={"name": "toy", "train_size": 16, "eval_size": 4},
        searcher={"model": model, "searchers": searchers, "temperature": 1.0},
        gateway={"enabled": True, "port": free_port(), "token_env": "TBA_GATEWAY_TOKEN", "reward_timeout_s": 60},
        filter={"scorers": ["structure", "finite_rewards", "lengths", "length_limits"], "max_poll_records": 20},
        buffer={"samples_per_prompt": 6, "on_policy_prob": 0.95},
        trainer={"prompts_per_step": 2, "micro_batch_prompts": 1, "lora_r": 0, "lr": 1e-2, "warmup_steps": 1,
                 "beta_start": 0.05, "beta_end": 0.05, "temperature": 1.0, "sync_every": 1, "min_buffer_prompts": 2,
                 "max_steps": 1_000_000, "eval_every": 1_000_000, "checkpoint_every": checkpoint_every,
                 "eval_prompts": 4, "eval_max_new_tokens": 6, "run_dir": str(root / "run")},
        weights={"port": free_port(), "subscription_s": 10},
        run={"budget_s": budget_s, "metrics_port": free_port(), "live_view": False, "filters": filters},
    )  # fmt: skip


@contextmanager
def gateway_job(root: Path, budget_s: float = 600, **shape) -> Iterator[tuple[TbaConfig, openai.OpenAI]]:
    """`tba run` of a gateway-fed job in root (shape: job_config's searchers, filters, checkpoint_every); yields
    its config and a client once the gateway answers. The job is stopped (SIGTERM: the trainer checkpoints) and
    its broker with it on the way out."""
    from tests.tiny_models import saved_tiny_llama

    cfg = job_config(root, saved_tiny_llama(root / "model"), budget_s, **shape)
    (root / "job.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "TBA_GATEWAY_TOKEN": TOKEN}
    job = subprocess.Popen([sys.executable, "-m", "tba.cli", "--config", str(root / "job.yaml"), "run"], cwd=ROOT,
                           env=env, stdout=open(root / "run.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.gateway.port}/v1", api_key=TOKEN, max_retries=0)
    try:
        deadline = time.monotonic() + 240
        while not serving(client):
            if job.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway never answered; see {root / 'run.log'}")
            time.sleep(1)
        yield cfg, client
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(180)
        except subprocess.TimeoutExpired:
            job.kill()
        job_broker(cfg).stop()


def serving(client: openai.OpenAI) -> bool:
    """Whether the gateway answers a request with the policy loaded (a 503 says it is still loading)."""
    try:
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        return True
    except (openai.APIConnectionError, openai.InternalServerError):
        return False


def run_agents(client: openai.OpenAI, clients: int, seconds: float) -> list[dict]:
    """`clients` agent loops in threads for `seconds`; every round's rewards, policy version and timing."""
    model = client.models.list().data[0].id
    rounds: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def agent(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            start = time.monotonic()
            done = agent_round(client, model, rng)
            with lock:
                rounds.append({**done, "started": start, "seconds": time.monotonic() - start})

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(rounds, key=lambda r: r["started"])
