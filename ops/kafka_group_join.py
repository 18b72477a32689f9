"""A consumer group member takes the outcome of every rebalance it joins, however short its polls.

kafka-python (3.0.12, pinned in setup.cfg) runs a rebalance (JoinGroup, then SyncGroup) as a task that may
outlive the poll() that started it, and looks at it again at a later poll only while it still finds a rejoin
needed (only then does a poll look at the group at all). A group leader that rejoined because the topic's
metadata changed stops needing one as soon as its own assignment records that metadata, mid-task: its next
poll returns without taking the assignment, with heartbeats still off, so the member holds no partition and
is soon expelled, for good (a searcher then serves no prompt again). And a task found finished is replaced by
a new attempt, a new rebalance of the whole group, instead of being taken. Here a rejoin stays needed while
an attempt is under way, and a finished attempt is taken first, as the library takes one that finishes within
a poll. tests/test_elastic.py shows the stuck member with 1 ms polls.
"""

from __future__ import annotations

import functools

import kafka
from kafka.coordinator.base import BaseCoordinator, MemberState
from kafka.coordinator.consumer import ConsumerCoordinator

if kafka.__version__ != "3.0.12":  # the attributes below are kafka-python's own: check them on an upgrade
    raise ImportError(f"ops/kafka_group_join.py was written against kafka-python 3.0.12, not {kafka.__version__}")


def _taking_finished_attempts(join_group_async):
    @functools.wraps(join_group_async)
    async def join_group(self: BaseCoordinator, timeout_ms=None):
        attempt = self._join_task
        if attempt is not None and attempt.is_done:
            self._join_task = None
            if attempt.succeeded():
                with self._lock:
                    self.rejoining = False
                    self.rejoin_needed = False
                    self.state = MemberState.STABLE
                    self._enable_heartbeat()
                g = self._generation
                await self._on_join_complete_async(g.generation_id, g.member_id, g.protocol, attempt.value)
            else:  # failed while no poll was waiting on it: the library's loop retries it (or raises, if fatal)
                with self._lock:
                    self.rejoin_needed = True
        return await join_group_async(self, timeout_ms)

    return join_group


def _while_an_attempt_is_under_way(need_rejoin):
    @functools.wraps(need_rejoin)
    def needed(self: ConsumerCoordinator) -> bool:
        return need_rejoin(self) or self._join_task is not None

    return needed


BaseCoordinator.join_group_async = _taking_finished_attempts(BaseCoordinator.join_group_async)
ConsumerCoordinator.need_rejoin = _while_an_attempt_is_under_way(ConsumerCoordinator.need_rejoin)
