"""The gateway's generation: one worker thread loads the policy, then serves requests in batches.

HTTP handlers submit a GenerationRequest and await its future. The worker takes the oldest pending
request, gathers those arriving within batch_wait_s (and up to max_batch_prompts) that share its
(temperature, max_tokens), and runs one generate call for all of them; requests with another key
wait for the next batch, ahead of newer ones. New policy versions are swapped in between batches,
as a searcher does, so every completion of a request comes from one version, which it carries.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from ops.errors import TbaError
from policy.generation import Completion, HFGenerator
from producers.generators import swap_in_newest
from producers.weight_subscriber import WeightSubscriber

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    n: int
    temperature: float
    max_tokens: int
    stops: tuple[str, ...] = ()
    top_logprobs: int = 0
    future: Future = field(default_factory=Future)  # -> Generated
    submitted: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[float, int]:
        """Requests batched together share this: one generate call takes one temperature and length."""
        return self.temperature, self.max_tokens


@dataclass
class Generated:
    completions: list[Completion]  # n, stop strings applied
    policy_version: int
    queued_s: float = 0.0  # from submit() until its batch began
    generate_s: float = 0.0  # its batch: the weight swap, if any, and the generate call


@dataclass
class BatcherStats:
    batches: int = 0  # generate calls
    requests: int = 0
    swaps: int = 0


def cut_at_stop(completion: Completion, stops: tuple[str, ...], tokenizer) -> Completion:
    """The completion cut at its first stop string, finish_reason "stop": the text without it (as OpenAI's API
    answers), the token ids (and their log-probs) through the token that completed it (as vLLM keeps them:
    the tokens the policy sampled up to where generation would have stopped)."""
    found = [at for at in (completion.text.find(s) for s in stops) if at >= 0]
    if not found:
        return completion
    ids = completion.token_ids.tolist()

    def reached(t: int) -> bool:  # the first t tokens already hold a stop string (prefixes decode to prefixes)
        text = tokenizer.decode(ids[:t], skip_special_tokens=True)
        return any(s in text for s in stops)

    low, high = 1, len(ids)
    while low < high:  # the fewest tokens that reach a stop string
        middle = (low + high) // 2
        low, high = (low, middle) if reached(middle) else (middle + 1, high)

    def cut(values):
        return None if values is None else values[:low]

    return replace(completion, text=completion.text[: min(found)], token_ids=completion.token_ids[:low],
                   logprobs=completion.logprobs[:low], ref_logprobs=completion.ref_logprobs[:low],
                   top_ids=cut(completion.top_ids), top_logprobs=cut(completion.top_logprobs),
                   finish_reason="stop")  # fmt: skip


class GenerationBatcher:
    def __init__(
        self,
        load_policy: Callable[[], HFGenerator],
        subscriber: WeightSubscriber | None,
        batch_wait_s: float,
        max_batch_prompts: int,
    ):
        self.load_policy = load_policy
        self.subscriber = subscriber
        self.batch_wait_s = batch_wait_s
        self.max_batch_prompts = max_batch_prompts
        self.generator: HFGenerator | None = None  # set once loaded: requests before that are refused (503)
        self.error: BaseException | None = None  # why the worker stopped (the policy did not load, ...): fatal
        self.policy_version = 0  # the initial weights are version 0, as for searchers
        self.stats = BatcherStats()
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()  # None: stop after what came before
        self._held: deque[GenerationRequest] = deque()  # taken from the queue, waiting for a batch of their key
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gateway-generation", daemon=True)

    @property
    def ready(self) -> bool:
        return self.generator is not None

    def start(self) -> GenerationBatcher:
        self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> Future:
        if self.error is not None:  # stopped: its process is about to go down with the reason
            raise self.error
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Serve every request submitted so far, then stop and release the policy."""
        self._queue.put(None)
        self._thread.join()
        if self.generator is not None:
            self.generator.close()
        if self.subscriber is not None:
            self.subscriber.close()

    def _run(self) -> None:
        try:
            self.generator = self.load_policy()
        except BaseException as exc:  # the gateway's main loop sees it and stops with it
            self.error = TbaError(f"the gateway could not load the policy: {exc}")
            log.error("%s", self.error)
            return
        log.info("gateway: policy loaded (version %d)", self.policy_version)
        try:
            while batch := self._next_batch():
                self._serve(batch)
        except Exception as exc:  # e.g. the weight subscriber stopped: never a worker that ends quietly
            self.error = TbaError(f"the gateway's generation stopped: {type(exc).__name__}: {exc}")
            log.error("%s", self.error)
            self._fail_waiting(self.error)

    def _fail_waiting(self, error: BaseException) -> None:
        """Answer every request still waiting with the error (each gets a 500) rather than leave it hanging."""
        waiting = list(self._held)
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for r in waiting:
            if r is not None and r.future.set_running_or_notify_cancel():
                r.future.set_exception(error)

    def _next_batch(self) -> list[GenerationRequest]:
        """The oldest request and those that may join it; [] once stopped and nothing is left."""
        if self._held:
            first = self._held.popleft()
        else:
            first = None if self._stopping else self._queue.get()
            if first is None:
                return []
        batch = [first]
        for request in list(self._held):  # held ones first: they came before anything still queued
            if len(batch) < self.max_batch_prompts and request.key == first.key:
                self._held.remove(request)
                batch.append(request)
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_prompts and not self._stopping:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                self._stopping = True
            elif request.key == first.key:
                batch.append(request)
            else:
                self._held.append(request)
        return batch

    def _serve(self, batch: list[GenerationRequest]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]  # a caller that went away: skip
        if not batch:
            return
        began = time.monotonic()
        try:
            version = swap_in_newest(self.subscriber, self.generator)
        except Exception as exc:  # the subscriber stopped: this batch fails, and the worker stops with it
            for r in batch:
                r.future.set_exception(exc)
            raise
        if version is not None:
            self.policy_version = version
            self.stats.swaps += 1
            log.info("gateway: generating with policy version %d", version)
        # each request's n completions as rows of `shared` samples of its prompt: one generate call for all
        shared = math.gcd(*(r.n for r in batch))
        rows = [r.prompt_ids for r in batch for _ in range(r.n // shared)]
        temperature, max_tokens = batch[0].key
        top = max(r.top_logprobs for r in batch)
        try:
            generated = self.generator.complete(rows, shared, temperature, max_tokens, top)
        except Exception as exc:  # that batch fails, with the reason, and the gateway goes on
            log.exception("gateway: a batch of %d requests failed", len(batch))
            for r in batch:
                r.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        took = time.monotonic() - began
        completions = iter(c for row in generated for c in row)
        tokenizer = self.generator.tokenizer
        for r in batch:
            mine = [cut_at_stop(next(completions), r.stops, tokenizer) for _ in range(r.n)]
            r.future.set_result(Generated(mine, self.policy_version, began - r.submitted, took))
