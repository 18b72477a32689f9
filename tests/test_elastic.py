"""Elastic searchers on the real broker: the searchers' consumer group over the prompts topic shares
the prompts, hands a leaving member's partitions to the others, redoes what a member took but never
committed, and `tba prompts load` / `tba scale searchers` drive it from outside."""

import json
import os
import subprocess
import sys
import threading
import time

from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import JobTopics, create_topics
from policy.tasks import Problem
from policy.tasks.prompts import problem_from_record
from producers.prompt_feed import PromptFeed, seed_prompts
from tests.conftest import make_config
from tests.test_run import wait_until

TBA = [sys.executable, "-m", "tba.cli"]


def problems(n: int) -> list[Problem]:
    return [
        Problem(f"p{i}", f"question {i}", str(i), ({"role": "user", "content": f"question {i}"},)) for i in range(n)
    ]


class Member:
    """A searcher without a model: takes prompts, 'acks' them at once, commits; records what it served."""

    def __init__(self, cfg, name: str):
        self.feed = PromptFeed(JobTopics(cfg).prompts, name, wait_s=0.5)
        self.served: list[str] = []
        self.stop = threading.Event()
        self.paused = threading.Event()  # as a searcher too far behind the trainer's policy versions
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.paused.is_set():
                    self.feed.idle()
                    time.sleep(0.2)
                    continue
                self.served += [p.prompt_id for p in self.feed.take(2)]
                self.feed.commit()
        finally:
            self.feed.close()

    def leave(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_two_searchers_share_the_prompts_and_one_takes_over_all_when_the_other_leaves(cfg):
    prompts = JobTopics(cfg).prompts
    assert seed_prompts(prompts, problems(12)) == 12
    assert seed_prompts(prompts, problems(12)) == 0  # a job's later searchers find the split written: one copy
    a, b = Member(cfg, "a"), Member(cfg, "b")
    try:
        # Kafka's group coordinator splits the 3 partitions between them, and both serve
        wait_until(lambda: a.feed.held and b.feed.held and a.served and b.served, 120, "both members to serve")
        assert not a.feed.held & b.feed.held and len(a.feed.held | b.feed.held) == 3
        a.leave()
        wait_until(lambda: len(b.feed.held) == 3, 120, "b to take over a's partitions")
        served_from = len(b.served)
        wait_until(lambda: set(b.served[served_from:]) == {f"p{i}" for i in range(12)}, 120, "b to serve every prompt")
        assert b.feed.epochs >= 1  # it came back round to the beginning of its partitions
    finally:
        a.leave()
        b.leave()


def test_a_searcher_paused_for_policy_lag_does_not_hold_up_a_new_one_joining(cfg):
    seed_prompts(JobTopics(cfg).prompts, problems(12))
    a = Member(cfg, "a")
    try:
        wait_until(lambda: len(a.feed.held) == 3 and a.served, 120, "a to hold every partition")
        a.paused.set()
        b = Member(cfg, "b")  # the group rebalances although a generates nothing meanwhile
        try:
            shared = lambda: a.feed.held and b.feed.held and len(a.feed.held | b.feed.held) == 3  # noqa: E731
            wait_until(lambda: shared() and b.served, 120, "b to join, get partitions of a's and serve")
            assert not a.feed.held & b.feed.held
        finally:
            b.leave()
        wait_until(lambda: len(a.feed.held) == 3, 120, "a to hold every partition again")
        served_from = len(a.served)
        a.paused.clear()
        # generating again, a serves every prompt again: from the partitions it took back, round to the next epoch
        every = {f"p{i}" for i in range(12)}
        wait_until(lambda: set(a.served[served_from:]) == every, 120, "a to serve every prompt again")
    finally:
        a.leave()


def test_prompts_taken_but_not_committed_are_served_again_by_the_next_member(broker):
    cfg = make_config(broker.bootstrap, topics={"partitions": 1})  # one partition: one order to follow
    create_topics(cfg)
    seed_prompts(JobTopics(cfg).prompts, problems(6))
    first = PromptFeed(JobTopics(cfg).prompts, "first")
    assert [p.prompt_id for p in first.take(2)] == ["p0", "p1"]
    first.commit()  # their groups were acked
    for _ in range(3):
        first.idle()  # paused for policy lag: it stays in the group and takes nothing
    assert [p.prompt_id for p in first.take(2)] == ["p2", "p3"]
    first.close()  # as if it died before its groups were acked: no commit
    second = PromptFeed(JobTopics(cfg).prompts, "second")
    assert [p.prompt_id for p in second.take(4)] == ["p2", "p3", "p4", "p5"]
    assert [p.prompt_id for p in second.take(2)] == ["p0", "p1"]  # the end: the next epoch
    assert second.epochs == 1
    second.close()


def test_tba_prompts_load_appends_a_jsonl_file_that_searchers_serve_instead_of_the_task_split(cfg, tmp_path):
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    lines = [{"id": "sum", "prompt": "What is 2 + 3?", "answer": "5"}, {"messages": chat}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {**os.environ, "TBA__KAFKA__BOOTSTRAP": cfg.kafka.bootstrap, "TBA__KAFKA__NAMESPACE": cfg.kafka.namespace}
    done = subprocess.run([*TBA, "prompts", "load", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"appended 2 prompt(s) to {cfg.kafka.namespace}.prompts" in done.stdout
    prompts = JobTopics(cfg).prompts
    loaded = {p.prompt_id: p for p in (problem_from_record(prompts.codec.decode(r.value)) for r in prompts.read())}
    assert loaded["sum"].answer == "5" and loaded["sum"].question == "What is 2 + 3?"
    assert loaded["1"].messages[0] == {"role": "system", "content": "Be brief."}
    assert seed_prompts(JobTopics(cfg).prompts, problems(5)) == 0  # the job's first searcher keeps what was loaded

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    done = subprocess.run([*TBA, "prompts", "load", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "line 1 of" in done.stderr and "neither 'prompt' nor 'messages'" in done.stderr


def test_tba_scale_searchers_adds_and_removes_searchers_of_a_running_job(cfg, tmp_path, monkeypatch):
    from tba.supervisor import Supervisor

    cfg = with_overrides(cfg, trainer={"run_dir": str(tmp_path)}, run={"metrics_port": 9900})
    supervisor = Supervisor(cfg)
    launched = []

    def launch(p):  # a stand-in process per role: the protocol between `tba scale` and the supervisor is the point
        p.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        p.started_at = time.monotonic()
        launched.append(p.name)

    monkeypatch.setattr(supervisor, "_launch", launch)
    stop = threading.Event()

    def supervise() -> None:  # what run_job does
        while not stop.wait(0.3):
            supervisor.tick()

    ticker = threading.Thread(target=supervise)
    supervisor.tick()
    ticker.start()
    env = {**os.environ, "TBA__TRAINER__RUN_DIR": str(tmp_path)}
    try:
        up = subprocess.run([*TBA, "scale", "searchers", "3"], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        assert "3 searcher(s) running: searcher-0, searcher-1, searcher-2" in up.stdout
        ports = {p.name: p.metrics_port for p in supervisor.processes}
        assert ports["searcher-1"] == 9903 and ports["searcher-2"] == 9904  # after the filter's 9902
        down = subprocess.run([*TBA, "scale", "searchers", "1"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert "1 searcher(s) running: searcher-0" in down.stdout
        state = {p["name"]: p for p in supervisor.state()["processes"]}
        assert state["searcher-2"]["status"] == "removed" and state["searcher-2"]["exit_codes"] == [-15]
    finally:
        stop.set()
        ticker.join()
        supervisor.stop()
    assert launched.count("searcher-2") == 1  # a removed searcher is not restarted
    os.utime(tmp_path / "job.json", (0, 0))  # as a job that stopped long ago
    gone = subprocess.run([*TBA, "scale", "searchers", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 1 and "no job is running" in gone.stderr


def test_a_member_whose_rebalance_outlives_its_poll_still_takes_its_assignment(cfg):
    """A rebalance's JoinGroup and SyncGroup often take longer than one short poll (a searcher polls for 200 ms):
    the member must take the assignment at a later poll. kafka-python 3.0.12 alone leaves it holding nothing,
    for good, when the rebalance was its own (as group leader) after a metadata change (ops/kafka_clients.py)."""
    from kafka.admin import NewPartitions

    from ops import kafka_clients

    topic = topic_names(cfg).prompts
    member = kafka_clients.consumer(cfg, group_id=f"{cfg.kafka.namespace}.short-polls", metadata_max_age_ms=500)
    member.subscribe([topic])
    wait_until(lambda: member.poll(timeout_ms=100) is not None and len(member.assignment()) == 3, 60, "3 partitions")
    admin = kafka_clients.admin(cfg)
    admin.create_partitions({topic: NewPartitions(total_count=4)})  # the leader sees it and rebalances
    admin.close()
    try:  # 1 ms polls: every attempt outlives the poll that started it
        wait_until(lambda: member.poll(timeout_ms=1) is not None and len(member.assignment()) == 4, 60, "4 partitions")
    finally:
        member.close()
