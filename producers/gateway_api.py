"""The gateway's side of OpenAI's API: the requests it takes and the bodies, chunks and errors it answers.

Fields the gateway cannot honour (top_p below 1, penalties, logit bias, tools, echo, suffix) are refused
with a 400 naming them rather than ignored: they would change the distribution the completions are
sampled from, and so the behaviour log-probs the trainer relies on. Other unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.generation import Completion

MAX_N = 128  # completions in one group, as OpenAI bounds n
MAX_TOP_LOGPROBS = 5
MAX_STOPS = 4
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names for the arms of a union


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def param_name(loc: Iterable) -> str | None:
    """A validation error's location as OpenAI names a parameter: ("body", "messages", 0, "content") ->
    "messages[0].content"; None for the body as a whole."""
    name = ""
    for part in list(loc)[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.split("[")[0] not in UNION_TAGS:
            name += f".{part}" if name else part
    return name or None


def _refuse(field: str, value, honoured, why: str):
    if value not in honoured:
        raise ValueError(f"{field} {value!r} is not supported: {why}")
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationParams(BaseModel):
    """What both routes take."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings, none empty")
        return stop

    @field_validator("top_p", "presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _sampled_as_trained(cls, value, info):
        honoured = {"top_p": (1.0,), "logit_bias": (None, {})}.get(info.field_name, (0.0,))
        return _refuse(info.field_name, value, honoured, "completions sample the policy's whole distribution, "
                       "whose log-probs the trainer uses")  # fmt: skip

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: not part of what the policy reads

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_turn(self) -> dict:
        """The turn as the chat template takes it (a developer message is the system's, as OpenAI treats it)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(GenerationParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top, info):
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools):
        return _refuse("tools", tools or None, (None,), "this gateway serves plain text completions")


class CompletionRequest(GenerationParams):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _plain(cls, value, info):
        return _refuse(info.field_name, value, (False, None), "this gateway answers with the completion alone")


class RewardRequest(BaseModel):
    """Per group, {"id", "rewards": [r0 .. r(n-1)]}, or per completion, {"id", "index", "reward"}."""

    model_config = ConfigDict(extra="forbid")

    id: str
    rewards: list[float] | None = None
    index: int | None = None
    reward: float | None = None

    @field_validator("rewards", "reward")
    @classmethod
    def _finite(cls, value, info):
        for i, r in enumerate(value if isinstance(value, list) else [value]):
            if r is not None and not math.isfinite(r):
                where = f"{info.field_name}[{i}]" if isinstance(value, list) else info.field_name
                raise ValueError(f"{where} is {r}: a reward is a finite number")
        return value

    def given(self) -> dict[int, float] | None:
        """index -> reward, or None when the body is neither form."""
        if self.rewards is not None and self.index is None and self.reward is None:
            return dict(enumerate(self.rewards))
        if self.rewards is None and self.index is not None and self.reward is not None:
            return {self.index: self.reward}
        return None


# -- answers -----------------------------------------------------------------------------------------------


class Rendering:
    """Completions as OpenAI's bodies show them, with the policy's tokenizer."""

    def __init__(self, tokenizer, model: str):
        self.tokenizer = tokenizer
        self.model = model
        self.eos_id = tokenizer.eos_token_id

    def _shown(self, c: Completion) -> int:
        """How many of the completion's tokens its text shows: all but a final EOS."""
        ends = c.token_ids.size and c.token_ids[-1] == self.eos_id
        return c.token_ids.size - 1 if ends else c.token_ids.size

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def _tops(self, c: Completion, t: int, top: int) -> list[tuple[str, float]]:
        if not top or c.top_ids is None:
            return []
        return [(self._token(i), float(lp)) for i, lp in zip(c.top_ids[t, :top], c.top_logprobs[t, :top], strict=True)]

    def chat_logprobs(self, c: Completion, top: int) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = []
        for t in range(self._shown(c)):
            alternatives = [entry(*x) for x in self._tops(c, t, top)]
            content.append({**entry(self._token(c.token_ids[t]), float(c.logprobs[t])), "top_logprobs": alternatives})
        return {"content": content, "refusal": None}

    def text_logprobs(self, c: Completion, top: int) -> dict:
        tokens = [self._token(c.token_ids[t]) for t in range(self._shown(c))]
        offsets = [sum(len(x) for x in tokens[:t]) for t in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [float(x) for x in c.logprobs[: len(tokens)]],
            "top_logprobs": [dict(self._tops(c, t, top)) for t in range(len(tokens))],
            "text_offset": offsets,
        }

    @staticmethod
    def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
        made = sum(c.token_ids.size for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": made, "total_tokens": prompt_tokens + made}

    def chat(self, response_id: str, created: int, completions: list[Completion], prompt_tokens: int,
             top: int | None) -> dict:  # fmt: skip
        """A chat.completion; top: None without log-probs, else how many alternatives each token shows."""
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "logprobs": None if top is None else self.chat_logprobs(c, top), "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ]  # fmt: skip
        return {"id": response_id, "object": "chat.completion", "created": created, "model": self.model,
                "choices": choices, "usage": self.usage(prompt_tokens, completions)}  # fmt: skip

    def text(self, response_id: str, created: int, completions: list[Completion], prompt_tokens: int,
             top: int | None) -> dict:  # fmt: skip
        """A text_completion; top: the request's logprobs (None: no log-probs)."""
        choices = [
            {"index": i, "text": c.text, "logprobs": None if top is None else self.text_logprobs(c, top),
             "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ]  # fmt: skip
        return {"id": response_id, "object": "text_completion", "created": created, "model": self.model,
                "choices": choices, "usage": self.usage(prompt_tokens, completions)}  # fmt: skip


def chat_chunks(response: dict, include_usage: bool) -> Iterator[dict]:
    """A chat.completion as the chunks a stream sends: per choice its role, its content (with its log-probs),
    its finish reason; then, when asked, a last chunk with the usage (every chunk has "usage": null before)."""
    head = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"],
            "model": response["model"], **({"usage": None} if include_usage else {})}  # fmt: skip
    for choice in response["choices"]:
        i = choice["index"]
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}  # fmt: skip
        yield {**head, "choices": [{"index": i, "delta": {"content": choice["message"]["content"]},
                                    "logprobs": choice["logprobs"], "finish_reason": None}]}  # fmt: skip
        yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                    "finish_reason": choice["finish_reason"]}]}  # fmt: skip
    if include_usage:
        yield {**head, "choices": [], "usage": response["usage"]}


def text_chunks(response: dict, include_usage: bool) -> Iterator[dict]:
    """A text_completion as a stream's chunks: per choice its text (with its log-probs), then its finish reason."""
    head = {"id": response["id"], "object": "text_completion", "created": response["created"],
            "model": response["model"], **({"usage": None} if include_usage else {})}  # fmt: skip
    for choice in response["choices"]:
        yield {**head, "choices": [{**choice, "finish_reason": None}]}
        yield {**head, "choices": [{"index": choice["index"], "text": "", "logprobs": None,
                                    "finish_reason": choice["finish_reason"]}]}  # fmt: skip
    if include_usage:
        yield {**head, "choices": [], "usage": response["usage"]}


def server_sent_events(chunks: Iterable[dict]) -> Iterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
