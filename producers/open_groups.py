"""Groups the gateway served and awaits rewards for, until they go to Kafka: raw when every reward is in,
the dead-letter topic when they do not come in time or the gateway stops first.

A group is produced to raw and flushed (acks=all) before the reward that completed it is answered,
so an acknowledged reward means the group is in Kafka. Deliveries happen one at a time: a delivery
error the producer raises is then that group's own, and the group stays open for the caller to post
its last reward again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ops import kafka_clients
from ops.config import TbaConfig
from ops.topics import JobTopics
from ops.trajectory_producer import TrajectoryProducer
from schemas.records import DeadLetter, TrajectoryGroup

log = logging.getLogger(__name__)
CLOSED_REMEMBERED = 10_000  # ids of groups already sent, so a reward posted again is answered, not "unknown"
STOPPED = "gateway stopped before rewards came"


class UnknownGroup(KeyError):
    """No open group has this id: never served, expired, or too long ago."""


class RewardIndexError(ValueError):
    """Rewards that do not fit the group: the message names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class GroupsStats:
    produced: int = 0  # groups in raw
    expired: int = 0  # groups dead-lettered: no rewards in time, or the gateway stopped first


class OpenGroups:
    def __init__(self, cfg: TbaConfig):
        self.timeout_s = cfg.gateway.reward_timeout_s
        topics = JobTopics(cfg)
        self.producer = TrajectoryProducer(cfg, topic=topics.raw)
        self.dlq = topics.dlq
        self.dlq.codec  # noqa: B018 (made now, as the raw topic's is: a schema store refusing it fails the start)
        self.letters = kafka_clients.producer(cfg)
        self.stats = GroupsStats()
        self._open: dict[str, tuple[TrajectoryGroup, float]] = {}  # id -> (group, deadline on the monotonic clock)
        self._closed: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (what happened, policy version)
        self._state = threading.Lock()  # held briefly, for the dicts
        self._delivery = threading.Lock()  # held across a send and its flush: one group in flight at a time

    def __len__(self) -> int:
        return len(self._open)

    def awaiting(self, group_id: str) -> TrajectoryGroup | None:
        """The open group of this id (its rewards so far), or None."""
        with self._state:
            return self._open.get(group_id, (None, 0.0))[0]

    def open(self, group: TrajectoryGroup) -> None:
        """Await rewards for group (its samples' rewards NaN until posted)."""
        with self._state:
            self._open[group.group_id] = (group, time.monotonic() + self.timeout_s)

    def reward(self, group_id: str, rewards: dict[int, float], whole: bool) -> dict:
        """Record rewards by completion index (whole: one for every completion); produce the group once all are
        in. The answer's body; UnknownGroup, RewardIndexError, or DeliveryError (the group stays open)."""
        with self._delivery:
            with self._state:
                if group_id not in self._open:
                    return self._answer_closed(group_id)
                group, _ = self._open[group_id]
                n = len(group.samples)
                if whole and len(rewards) != n:
                    raise RewardIndexError("rewards", f"{len(rewards)} rewards for the group's {n} choices")
                for index in rewards:
                    if not 0 <= index < n:
                        raise RewardIndexError("index", f"index {index} is not one of the group's {n} choices")
                for index, reward in rewards.items():
                    group.samples[index].reward = float(reward)
                missing = [i for i, s in enumerate(group.samples) if math.isnan(s.reward)]
            if missing:
                return {"id": group_id, "status": "pending", "missing": missing, "policy_version": group.policy_version}
            self.producer.send(group)
            self.producer.flush()  # acks=all; a DeliveryError leaves the group open, its rewards kept
            with self._state:
                del self._open[group_id]
                self._remember(group_id, "produced", group.policy_version)
            self.stats.produced += 1
        return {"id": group_id, "status": "produced", "policy_version": group.policy_version}

    def _answer_closed(self, group_id: str) -> dict:
        if group_id in self._closed and self._closed[group_id][0] == "produced":  # posted again: already done
            return {"id": group_id, "status": "produced", "policy_version": self._closed[group_id][1]}
        why = self._closed[group_id][0] if group_id in self._closed else "no such group"
        raise UnknownGroup(f"no open group {group_id!r}: {why}")

    def _remember(self, group_id: str, what: str, policy_version: int) -> None:
        self._closed[group_id] = (what, policy_version)
        while len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

    def expire(self, now: float | None = None) -> int:
        """Dead-letter the groups past their deadline; how many."""
        now = time.monotonic() if now is None else now
        with self._delivery:
            with self._state:
                due = [group for group, deadline in self._open.values() if deadline <= now]
            return self._dead_letter(due, None)

    def run_expiry(self, stop: threading.Event) -> None:
        """Expire groups until stop is set (a thread's target)."""
        while not stop.wait(min(1.0, self.timeout_s / 4)):
            try:
                self.expire()
            except Exception as exc:  # Kafka away: the groups stay open and the next look tries again
                log.warning("gateway: could not dead-letter expired groups: %s", exc)

    def _dead_letter(self, groups: list[TrajectoryGroup], reason: str | None) -> int:
        """To the dlq, reason given or the timeout's; closed once Kafka acknowledged them. Holds the delivery lock."""
        sent = []
        for group in groups:
            rewarded = sum(not math.isnan(s.reward) for s in group.samples)
            why = reason or (
                f"no rewards within {self.timeout_s:g} s"
                if not rewarded
                else f"rewards for {rewarded} of {len(group.samples)} completions within {self.timeout_s:g} s"
            )
            letter = DeadLetter(why, "gateway", self.producer.topic.name, -1, -1, group.prompt_id.encode(),
                                self.producer.codec.encode(group))  # fmt: skip
            sent.append(self.dlq.produce(self.letters, letter, key=letter.key))
            log.info("gateway: group %s to %s: %s", group.group_id, self.dlq, why)
        if not groups:
            return 0
        timeout_s = self.producer.cfg.kafka.client_timeout_s
        self.letters.flush(timeout=timeout_s)
        for future in sent:  # raises what Kafka said: the groups stay open, and the next look sends them again
            future.get(timeout=timeout_s)
        with self._state:
            for group in groups:
                del self._open[group.group_id]
                self._remember(group.group_id, f"sent to the dead-letter topic ({reason or 'expired'})", -1)
        self.stats.expired += len(groups)
        return len(groups)

    def close(self) -> None:
        """Dead-letter every group still open (STOPPED), then close the producers, each waiting on Kafka in bounds."""
        try:
            with self._delivery:
                with self._state:
                    left = [group for group, _ in self._open.values()]
                self._dead_letter(left, STOPPED)
        finally:
            self.producer.close(kafka_clients.CLOSE_TIMEOUT_S)
            self.letters.close(timeout=kafka_clients.CLOSE_TIMEOUT_S)
