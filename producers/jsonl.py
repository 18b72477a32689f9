"""External generators: JSON Lines -> TrajectoryGroups -> the raw topic (`tba produce FILE.jsonl`).

One JSON object per line, fields as in the TrajectoryGroup Avro schema, but with token ids and
log-probs as plain JSON lists (we pack them). The least a line needs is a prompt_id, a prompt (or
chat messages) and each sample's completion and reward: the filter fills in the rest. README.md
documents the fields. Each line is validated on its own; an invalid line is reported with its
number and reason and skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from kafka.errors import MessageSizeTooLargeError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ops.trajectory_producer import TrajectoryProducer
from schemas.records import Sample, TrajectoryGroup, now_ms


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonlSample(_Line):
    completion: str
    reward: float
    finish_reason: Literal["stop", "length"] = "stop"
    # optional: the filter tokenizes the completion and computes reference log-probs with the job's models
    token_ids: list[int] = []
    logprobs: list[float] = []
    ref_logprobs: list[float] = []

    @model_validator(mode="after")
    def _lengths_agree(self):
        if mismatch := self.to_sample().logprobs_mismatch(ref_required=False):  # the filter computes missing ones
            raise ValueError(mismatch)
        if not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        return self

    def to_sample(self) -> Sample:
        return Sample(
            completion=self.completion,
            token_ids=np.array(self.token_ids, np.int32),
            logprobs=np.array(self.logprobs, np.float32),
            ref_logprobs=np.array(self.ref_logprobs, np.float32),
            reward=self.reward,
            finish_reason=self.finish_reason,
        )


class JsonlMessage(_Line):
    role: str = Field(min_length=1)
    content: str


class JsonlGroup(_Line):
    prompt_id: str = Field(min_length=1)
    task: str = ""
    prompt: str = ""
    messages: list[JsonlMessage] = []
    prompt_token_ids: list[int] = []
    # TrajectoryGroup.empty() as the line's schema, so that the error names the field as the line spells it
    samples: list[JsonlSample] = Field(min_length=1)
    group_id: str | None = None
    policy_version: int = -1
    generator_id: str = ""
    model_id: str = ""
    created_at: int | None = None
    metadata: dict[str, str] = {}

    @model_validator(mode="after")
    def _has_a_prompt(self):
        if not (self.prompt or self.messages or self.prompt_token_ids):
            raise ValueError("give the prompt as prompt, messages or prompt_token_ids")
        return self

    def to_group(self) -> TrajectoryGroup:
        extra = {"group_id": self.group_id or ""}  # none given: the filter names it by its content
        return TrajectoryGroup(
            prompt_id=self.prompt_id,
            task=self.task,
            prompt=self.prompt,
            messages=[m.model_dump() for m in self.messages],
            prompt_token_ids=np.array(self.prompt_token_ids, np.int32),
            samples=[s.to_sample() for s in self.samples],
            policy_version=self.policy_version,
            generator_id=self.generator_id,
            model_id=self.model_id,
            created_at=self.created_at or now_ms(),
            metadata=self.metadata,
            **extra,
        )


@dataclass
class InvalidLine:
    line: int
    reason: str


def parse_lines(lines: Iterator[str]) -> Iterator[tuple[int, TrajectoryGroup | InvalidLine]]:
    """(line number, TrajectoryGroup or InvalidLine with the reason) for each non-blank line."""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            yield number, JsonlGroup.model_validate(json.loads(text)).to_group()
        except json.JSONDecodeError as exc:
            yield number, InvalidLine(number, f"not JSON: {exc.msg} at column {exc.colno}")
        except ValidationError as exc:
            yield number, InvalidLine(number, "; ".join(_reason(e) for e in exc.errors()))
        except (ValueError, OverflowError) as exc:
            yield number, InvalidLine(number, str(exc))


def _reason(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "line"
    return f"{field}: {err['msg']}"


def produce_file(path: str | Path, producer: TrajectoryProducer) -> tuple[int, list[InvalidLine]]:
    """Publish every valid line of a JSONL file; returns (groups acknowledged, invalid lines)."""
    invalid: list[InvalidLine] = []
    sent = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, item in parse_lines(fh):
            if isinstance(item, InvalidLine):
                invalid.append(item)
                continue
            try:
                producer.send(item)
            except (ValueError, TypeError, OverflowError) as exc:  # e.g. a token id beyond int32
                invalid.append(InvalidLine(number, f"not encodable as TrajectoryGroup: {exc}"))
                continue
            except MessageSizeTooLargeError:
                size, limit = len(producer.codec.encode(item)), producer.max_bytes
                reason = f"group is {size} bytes encoded, over kafka.max_message_bytes ({limit}): split its samples"
                invalid.append(InvalidLine(number, reason))
                continue
            sent += 1
    producer.flush()
    return sent, invalid
