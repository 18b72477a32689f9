"""The TB trainer on a tiny model: checkpoint, kill, resume gives the same next step; versions get published."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import JobTopics
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import synthetic_group
from producers.weight_subscriber import WeightSubscriber
from tests.tiny_models import saved_tiny_llama, tiny_llama
from trainer.checkpoint import latest_checkpoint
from trainer.curated_feed import CuratedFeed, curated_buffer
from trainer.replay_buffer import ReplayBuffer
from trainer.train import Trainer
from trainer.weight_sync import WeightSyncServer


@pytest.fixture
def tcfg(cfg, store, tmp_path):
    rng = np.random.default_rng(0)
    with TrajectoryProducer(cfg, topic=JobTopics(cfg, store).curated) as producer:
        for i in range(24):
            producer.send(synthetic_group(rng, i % 8, samples=4, tokens=10, policy_version=i // 8, vocab=128))
    return with_overrides(
        cfg,
        buffer={"samples_per_prompt": 4, "on_policy_prob": 0.5, "reward_inv_temp": 1.0},
        trainer={
            "prompts_per_step": 3,
            "micro_batch_prompts": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "run_dir": str(tmp_path / "run"),
        },
        weights={"port": 0, "subscription_s": 5},
    )


def seeded_buffer(cfg, store) -> ReplayBuffer:
    return curated_buffer(cfg, JobTopics(cfg, store).curated, seed=3)


def trainer_for(cfg, store, seed, server=None):
    buffer = seeded_buffer(cfg, store)
    feed = CuratedFeed(cfg, buffer)
    return Trainer(cfg, tiny_llama(seed), buffer, pad_id=0, server=server, feed=feed)


def test_checkpoint_kill_resume_gives_the_uninterrupted_next_step(tcfg, store):
    uninterrupted = trainer_for(tcfg, store, seed=0)
    uninterrupted.feed.fill()
    losses = [uninterrupted.train_step().loss for _ in range(3)]
    assert all(np.isfinite(losses))
    path = uninterrupted.save()
    assert (path / "model" / "model.safetensors").exists()
    expected = uninterrupted.train_step()

    resumed = trainer_for(tcfg, store, seed=7)  # other initial weights: the checkpoint must replace them
    assert resumed.resume()
    assert resumed.step == 3 and len(resumed.buffer) == 24
    assert resumed.feed.poll(200) == 0  # consumed offsets restored: nothing is admitted twice
    got = resumed.train_step()
    assert got.loss == pytest.approx(expected.loss, rel=1e-6, abs=1e-9)
    assert got.mean_reward == expected.mean_reward
    uninterrupted.close()
    resumed.close()


def test_checkpoint_weights_load_with_from_pretrained(tcfg, store):
    from transformers import AutoModelForCausalLM

    t = trainer_for(tcfg, store, seed=0)
    t.feed.fill()
    t.train_step()
    path = t.save()
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    for name, tensor in t.model.state_dict().items():
        assert (loaded.state_dict()[name] == tensor).all()
    t.close()


def publishing_every_2_steps(tcfg, store):
    """A trainer with its buffer filled, publishing a version every 2 steps to a running server."""
    cfg = with_overrides(tcfg, trainer={"sync_every": 2})
    server = WeightSyncServer(cfg)
    server.start()
    t = trainer_for(cfg, store, seed=0, server=server)
    t.feed.fill()
    return cfg, t, server


def test_a_new_policy_version_is_published_every_k_steps(tcfg, store):
    cfg, t, server = publishing_every_2_steps(tcfg, store)
    sub = WeightSubscriber(cfg.weights, server.target, "s").start()
    results = [t.train_step() for _ in range(4)]
    got = sub.wait_for(2, 20)
    assert t.policy_version == 2 and got.step == 4
    assert (got.state_dict()["model.norm.weight"] == t.model.state_dict()["model.norm.weight"]).all()
    assert [r.step for r in results] == [1, 2, 3, 4]
    sub.close()
    t.close()
    server.stop()


def test_lora_trains_and_publishes_adapters_only_and_resumes(tcfg, store):
    import torch

    from policy.models import apply_lora, load_into

    cfg = with_overrides(tcfg, trainer={"lora_r": 4, "lora_targets": ["q_proj", "v_proj"]})
    t = Trainer(cfg, apply_lora(tiny_llama(0), cfg.trainer), seeded_buffer(cfg, store), pad_id=0)
    t.feed = CuratedFeed(cfg, t.buffer)
    t.feed.fill()
    t.train_step()
    t.train_step()
    published = t.published_state()
    assert published and all(".lora_" in name for name in published)
    searcher_model = apply_lora(tiny_llama(0), cfg.trainer)  # a searcher carries the same adapters
    load_into(searcher_model, published)
    prompt = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(searcher_model(prompt).logits, t.model(prompt).logits)
        assert not torch.allclose(tiny_llama(0)(prompt).logits, t.model(prompt).logits)

    t.save()
    expected = t.train_step()
    resumed = Trainer(cfg, apply_lora(tiny_llama(0), cfg.trainer), seeded_buffer(cfg, store), pad_id=0)
    resumed.feed = CuratedFeed(cfg, resumed.buffer)
    assert resumed.resume()
    assert resumed.train_step().loss == pytest.approx(expected.loss, rel=1e-6, abs=1e-9)
    t.close()
    resumed.close()


def test_tba_replay_retrains_from_a_past_range_of_curated(tcfg, store, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from ops.topics import read_topic
    from tba.cli import cli

    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        tcfg,
        searcher={"model": str(tmp_path / "model")},
        task={"name": "toy", "train_size": 4, "eval_size": 2},
        trainer={"prompts_per_step": 2, "max_steps": 2, "min_buffer_prompts": 2, "eval_prompts": 2,
                 "eval_max_new_tokens": 4, "run_dir": str(tmp_path / "replay-run")},
    )  # fmt: skip
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    in_range = sum(r.offset < 4 for r in read_topic(cfg, topic_names(cfg).curated))
    replay = ["--config", str(config), "replay", "--from", "0", "--to", "4"]
    done = CliRunner().invoke(cli, replay)
    assert done.exit_code == 0, done.output
    assert f"replay trained 2 steps on {in_range} groups" in done.output
    again = CliRunner().invoke(cli, replay)  # the same replay, e.g. after a crash: it resumes (here: already done)
    assert again.exit_code == 0 and f"replay trained 2 steps on {in_range} groups" in again.output, again.output
    other = CliRunner().invoke(cli, ["--config", str(config), "replay", "--to", "2"])  # not this run dir's job
    assert "holds a checkpoint of another job" in str(other.exception)

    # a new policy from that checkpoint's weights, in a run dir of its own (one step at a negligible lr)
    fork = with_overrides(cfg, trainer={"run_dir": str(tmp_path / "fork"), "max_steps": 1, "lr": 1e-12})
    config.write_text(yaml.safe_dump(fork.model_dump(mode="json")))
    forked = CliRunner().invoke(cli, [*replay[:2], "replay", "--init", str(tmp_path / "replay-run")])
    assert forked.exit_code == 0, forked.output
    base = load_file(next((tmp_path / "model").glob("*.safetensors")))
    init, after = (load_file(next((latest_checkpoint(tmp_path / r) / "model").glob("*.safetensors")))
                   for r in ("replay-run", "fork"))  # fmt: skip
    assert init.keys() == after.keys() and all(torch.allclose(init[k], after[k], atol=1e-8) for k in init)
    assert any(not torch.allclose(init[k], base[k], atol=1e-4) for k in init)  # and the base model is not

    later = with_overrides(cfg, trainer={"run_dir": str(tmp_path / "empty-run")})
    config.write_text(yaml.safe_dump(later.model_dump(mode="json")))
    empty = CliRunner().invoke(cli, ["--config", str(config), "replay", "--from", "2030-01-01T00:00:00Z"])
    assert "fewer than trainer.min_buffer_prompts (2), and nothing more will arrive" in str(empty.exception)
    assert not (tmp_path / "empty-run" / "checkpoints").exists()  # a corrected range can start afresh there
    for bounds, says in ((["--from", "5", "--to", "2"], "the range is empty"), (["--from", "-3"], "0 or more")):
        refused = CliRunner().invoke(cli, ["--config", str(config), "replay", *bounds])
        assert refused.exit_code == 2 and says in refused.output, refused.output


def test_staleness_is_counted_against_the_version_the_batch_was_trained_with(tcfg, store):
    _, t, server = publishing_every_2_steps(tcfg, store)
    staleness, trained_with = [], []
    for _ in range(5):
        batch = t.buffer.sample(3)
        for p in batch:  # every sample made by version 0
            p.policy_versions = [0] * len(p.samples)
        trained_with.append(t.policy_version)
        staleness.append(t.train_step(batch).staleness)
    # versions 1 and 2 are published after steps 2 and 4: steps 3-4 train version 1, step 5 version 2
    assert trained_with == [0, 0, 1, 1, 2] and staleness == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert t.staleness_counts == {0: 2 * 3 * 4, 1: 2 * 3 * 4, 2: 3 * 4}
    batch = t.buffer.sample(3)
    for p in batch:  # from far back in a long job's history: one key past the histogram's bound, not one per value
        p.policy_versions = [-1000] * len(p.samples)
    t.train_step(batch)
    assert t.staleness_counts == {0: 2 * 3 * 4, 1: 2 * 3 * 4, 2: 3 * 4, 17: 3 * 4}
    assert t.staleness_sum == 1 * 2 * 3 * 4 + 2 * 3 * 4 + 1002 * 3 * 4
    t.close()
    server.stop()


def test_a_step_waits_for_new_groups_once_the_history_was_trained_max_replay_ratio_times(tcfg, store):
    import threading
    import time

    from ops.metrics import trainer_metrics

    cfg = with_overrides(tcfg, buffer={"max_replay_ratio": 0.25})  # 24 groups: 6 prompts, two steps of 3
    t = trainer_for(cfg, store, seed=0)
    deadline = time.monotonic() + 30
    while t.buffer.received < 24 and time.monotonic() < deadline:
        t.feed.poll(200)
    assert t.buffer.received == 24 and t.ready
    for _ in range(2):
        t.wait_for_data()
        t.train_step()
    assert t.replay_ratio == 6 / 24 and t.held_by_replay_bound() and not t.ready
    ready = {m.name: m.samples[0].value for m in trainer_metrics(t)}["tba_trainer_ready"]
    assert ready == 0.0  # what the supervisor's stall check reads: waiting for groups is not a stall

    stop, waited = threading.Event(), threading.Event()
    waiter = threading.Thread(target=lambda: (t.wait_for_data(stop), waited.set()))
    waiter.start()
    assert not waited.wait(2)  # the history alone does not allow a third step
    rng = np.random.default_rng(1)
    with TrajectoryProducer(cfg, topic=JobTopics(cfg, store).curated) as producer:
        for i in range(12):  # 36 groups: 9 prompts may be trained
            producer.send(synthetic_group(rng, 8 + i, samples=4, tokens=10, policy_version=3, vocab=128))
    assert waited.wait(30), "the step did not go on once new groups came"
    waiter.join()
    assert t.ready and t.buffer.received == 36
    t.train_step()
    assert t.replay_ratio == 9 / 36 and not t.ready

    t.feed.close()
    t.feed = None  # a replay without --live: its range is all there will be, trained as often as it is told
    assert not t.held_by_replay_bound() and t.ready
    t.close()


def test_a_stop_during_an_evaluation_gives_it_up_and_the_trainer_checkpoints_at_once(tcfg, tmp_path, monkeypatch):
    """256 held-out problems take ~2 minutes on 2 cores, longer than the trainer's stop timeout: a stop that waited
    for them ended in a kill, without the checkpoint of the last steps."""
    import threading

    from ops.metrics import metric_rows
    from policy.generation import HFGenerator
    from trainer import evaluation
    from trainer.job import run_trainer

    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        tcfg,
        searcher={"model": str(tmp_path / "model")},
        task={"name": "toy", "train_size": 4, "eval_size": 8},
        trainer={"prompts_per_step": 2, "max_steps": 3, "min_buffer_prompts": 2, "eval_every": 1, "eval_prompts": 8,
                 "eval_max_new_tokens": 4},
    )  # fmt: skip
    monkeypatch.setattr(evaluation, "CHUNK", 2)  # an evaluation: 4 chunks greedy, then 4 sampled
    stop, chunks, texts = threading.Event(), [], HFGenerator.texts

    def stop_in_the_second_evaluation(self, prompts, sample):
        chunks.append(len(prompts))
        if len(chunks) == 9:  # the first chunk of the evaluation after step 1: as a SIGTERM would, mid-way
            stop.set()
        return texts(self, prompts, sample)

    monkeypatch.setattr(HFGenerator, "texts", stop_in_the_second_evaluation)
    trainer = run_trainer(cfg, stop)
    assert chunks == [2] * 9  # the chunk in hand finished, no other started
    rows = metric_rows(tmp_path / "run")
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("train", 1)]  # no evaluation of step 1 recorded
    assert trainer.step == 1 and latest_checkpoint(tmp_path / "run").name == "step-000001"  # saved as it stopped
