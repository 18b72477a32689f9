"""The OpenAI-compatible gateway (`tba gateway`): agents and applications call the policy being trained as
they would call OpenAI's API, then post a reward for each completion; a request's n completions are one
TrajectoryGroup, produced to raw once its rewards are in (producers/open_groups.py).

Routes: POST /v1/chat/completions and /v1/completions (generated in batches: producers/gateway_batcher.py),
GET /v1/models, POST /v1/rewards. Every response's id is its group's id. With the environment variable
gateway.token_env names set, every route wants `Authorization: Bearer <that token>`. The groups carry the
behaviour log-probs of the generation itself and no reference log-probs: the filter computes those.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ops.config import TbaConfig
from ops.errors import ConfigError, DeliveryError
from ops.job import model_id
from policy.generation import HFGenerator
from policy.models import chat_prompt_ids
from producers.gateway_api import (
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    Rendering,
    RewardRequest,
    chat_chunks,
    error_body,
    param_name,
    server_sent_events,
    text_chunks,
)
from producers.gateway_batcher import GenerationBatcher, GenerationRequest
from producers.open_groups import OpenGroups, RewardIndexError, UnknownGroup
from producers.weight_subscriber import WeightSubscriber
from schemas.records import Sample, TrajectoryGroup

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5  # what a request that came while the policy loads is told
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/rewards")
GATEWAY_SEED_OFFSET = 1 << 16  # its sampling seed, apart from searcher i's (searcher.seed + i)


class GatewayError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


class Gateway:
    """The gateway's state: generation, the groups awaiting rewards, and the counts its metrics show."""

    def __init__(self, cfg: TbaConfig, load_policy: Callable[[], HFGenerator], subscriber: WeightSubscriber | None):
        if cfg.gateway.max_tokens > cfg.gateway.max_tokens_limit:
            raise ConfigError(f"gateway.max_tokens: {cfg.gateway.max_tokens} is above gateway.max_tokens_limit")
        self.cfg = cfg
        self.settings = cfg.gateway
        self.model_id = model_id(cfg)
        self.token = os.environ.get(cfg.gateway.token_env) or None  # never logged
        self.batcher = GenerationBatcher(load_policy, subscriber, cfg.gateway.batch_wait_ms / 1000,
                                         cfg.gateway.max_batch_prompts)  # fmt: skip
        self.groups = OpenGroups(cfg)
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> requests
        self.rendering: Rendering | None = None  # once the policy (its tokenizer) is loaded
        self._stop_expiry = threading.Event()
        self._expiry = threading.Thread(target=self.groups.run_expiry, args=(self._stop_expiry,), daemon=True,
                                        name="gateway-expiry")  # fmt: skip
        self.app = gateway_app(self)

    @property
    def policy_version(self) -> int:
        return self.batcher.policy_version

    def start(self) -> Gateway:
        self.batcher.start()
        self._expiry.start()
        return self

    def close(self) -> None:
        """Finish the generation asked for, dead-letter the groups still awaiting rewards, close the producers."""
        try:
            self.batcher.close()
        finally:
            self._stop_expiry.set()
            self._expiry.join()
            self.groups.close()

    def generator(self) -> HFGenerator:
        """The loaded policy, or a 503 saying to come back."""
        generator = self.batcher.generator
        if generator is None:
            raise GatewayError(503, "the policy is still loading; retry shortly", "service_unavailable",
                               headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        if self.rendering is None:
            self.rendering = Rendering(generator.tokenizer, self.model_id)
        return generator

    def check(self, params: GenerationParams, prompt_ids: list[int], prompt_param: str) -> int:
        """The request's max_tokens, once its model, length and prompt are fine for this policy."""
        if params.model != self.model_id:
            raise GatewayError(404, f"the model {params.model!r} does not exist: this gateway serves {self.model_id!r}",
                               param="model", code="model_not_found")  # fmt: skip
        asked = getattr(params, "max_completion_tokens", None) or params.max_tokens
        max_tokens = asked or self.settings.max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise GatewayError(400, f"max_tokens {max_tokens} is above this gateway's limit of "
                               f"{self.settings.max_tokens_limit}", param="max_tokens")  # fmt: skip
        if not prompt_ids:
            raise GatewayError(400, "the prompt is empty", param=prompt_param)
        context = getattr(self.batcher.generator.model.config, "max_position_embeddings", None)
        if context and len(prompt_ids) + max_tokens > context:
            raise GatewayError(400, f"the prompt's {len(prompt_ids)} tokens and max_tokens {max_tokens} exceed the "
                               f"model's context of {context}", param=prompt_param)  # fmt: skip
        return max_tokens

    async def generate(self, params: GenerationParams, prompt_ids: list[int], max_tokens: int, top: int | None):
        """The request's n completions (one group, opened to await rewards), its id, and the Server-Timing
        header that says how long it queued and how long its batch generated (the rest is the gateway's)."""
        request = GenerationRequest(prompt_ids, params.n, params.temperature, max_tokens, params.stops, top or 0)
        generated = await asyncio.wrap_future(self.batcher.submit(request))
        group = self.group(prompt_ids, generated.completions, generated.policy_version, params.temperature)
        self.groups.open(group)
        timing = f"queue;dur={generated.queued_s * 1000:.2f}, generate;dur={generated.generate_s * 1000:.2f}"
        return group.group_id, generated.completions, {"Server-Timing": timing}

    def group(self, prompt_ids: list[int], completions, policy_version: int, temperature: float) -> TrajectoryGroup:
        """The group as the trainer will see it, rewards NaN until posted, no reference log-probs."""
        ids = np.array(prompt_ids, np.int32)
        return TrajectoryGroup(
            prompt_id=f"{self.settings.task_label}-{hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()}",
            task=self.settings.task_label,
            prompt=self.batcher.generator.tokenizer.decode(prompt_ids),
            prompt_token_ids=ids,
            samples=[
                Sample(c.text, c.token_ids, c.logprobs, np.zeros(0, np.float32), float("nan"), c.finish_reason)
                for c in completions
            ],
            policy_version=policy_version,
            generator_id="gateway",
            model_id=self.model_id,
            group_id=f"tba-{uuid.uuid4().hex}",
            metadata={"temperature": str(temperature), "source": "gateway"},
        )


def answer(body: dict, params: GenerationParams, chunks, headers: dict[str, str]):
    """The body as JSON, or as server-sent events of chunks(body, include_usage) when the request streams."""
    if not params.stream:
        return JSONResponse(body, headers=headers)
    include_usage = bool(params.stream_options and params.stream_options.include_usage)
    return StreamingResponse(server_sent_events(chunks(body, include_usage)), media_type="text/event-stream",
                             headers=headers)  # fmt: skip


def gateway_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="tba gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        began = time.perf_counter()
        if gw.token is not None and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {gw.token}".encode()
        ):
            response = JSONResponse(error_body("missing or wrong bearer token (Authorization: Bearer ...)",
                                               code="invalid_api_key"), status_code=401)  # fmt: skip
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a failed generation batch, a bug: an answer in OpenAI's shape all the same
                log.exception("gateway: %s %s failed", request.method, request.url.path)
                response = JSONResponse(error_body(f"the gateway failed: {exc!r}", "server_error"), status_code=500)
        route = request.url.path if request.url.path in ROUTES else "other"
        gw.requests[(route, response.status_code)] += 1
        if "server-timing" in response.headers:  # and the whole time in the app: the rest is the gateway's own
            response.headers["server-timing"] += f", app;dur={(time.perf_counter() - began) * 1000:.2f}"
        return response

    @app.exception_handler(GatewayError)
    async def gateway_error(_request, exc: GatewayError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = None if first["type"] == "json_invalid" else param_name(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        generator = gw.generator()
        prompt_ids = chat_prompt_ids(generator.tokenizer, [m.as_turn() for m in body.messages])
        max_tokens = gw.check(body, prompt_ids, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        group_id, completions, headers = await gw.generate(body, prompt_ids, max_tokens, top)
        response = gw.rendering.chat(group_id, int(time.time()), completions, len(prompt_ids), top)
        return answer(response, body, chat_chunks, headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        generator = gw.generator()
        prompt_ids = generator.tokenizer.encode(body.prompt)
        max_tokens = gw.check(body, prompt_ids, "prompt")
        group_id, completions, headers = await gw.generate(body, prompt_ids, max_tokens, body.logprobs)
        response = gw.rendering.text(group_id, int(time.time()), completions, len(prompt_ids), body.logprobs)
        return answer(response, body, text_chunks, headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": gw.model_id, "object": "model", "created": 0, "owned_by": "tba"}]}

    @app.post("/v1/rewards")
    def rewards(body: RewardRequest):  # a plain def: it waits on Kafka in a worker thread, not the event loop
        given = body.given()
        if given is None:
            raise GatewayError(400, 'give "rewards" (one per choice) or "index" and "reward"', param="rewards")
        try:
            return gw.groups.reward(body.id, given, whole=body.rewards is not None)
        except UnknownGroup as exc:
            raise GatewayError(404, exc.args[0], param="id", code="group_not_found") from exc
        except RewardIndexError as exc:
            raise GatewayError(400, str(exc), param=exc.param) from exc
        except DeliveryError as exc:
            raise GatewayError(503, f"the group could not be delivered to Kafka ({exc}); post the rewards again",
                               "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc  # fmt: skip

    return app


class GatewayServer:
    """The gateway's app served by uvicorn on a thread of its own; stop() drains it and closes the gateway."""

    def __init__(self, gateway: Gateway, host: str, port: int):
        self.gateway = gateway
        self.socket = socket.create_server((host, port), reuse_port=False)  # bound now: port 0 gets its number
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(gateway.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                        name="gateway-http")  # fmt: skip

    def start(self) -> GatewayServer:
        self.gateway.start()
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop taking requests, answer those in flight (their generation finishes), then close the gateway."""
        self.server.should_exit = True
        self._thread.join()
        self.socket.close()
        self.gateway.close()


def serve_gateway(cfg: TbaConfig, stop: threading.Event, host: str | None = None, port: int | None = None,
                  metrics_port: int | None = None) -> Gateway:  # fmt: skip
    """`tba gateway`: serve until stop is set (SIGTERM, Ctrl-C), then stop cleanly."""
    from ops.metrics import gateway_metrics, metrics_served
    from producers.generators import build_generator, weight_subscriber

    seed = cfg.searcher.seed + GATEWAY_SEED_OFFSET
    gateway = Gateway(cfg, lambda: build_generator(cfg, seed, with_reference=False), weight_subscriber(cfg, "gateway"))
    server = GatewayServer(gateway, host or cfg.gateway.host, cfg.gateway.port if port is None else port)
    with metrics_served(metrics_port, lambda: gateway_metrics(gateway)):
        server.start()
        log.info("gateway on http://%s:%d/v1 serving %s (auth: %s)", host or cfg.gateway.host, server.port,
                 gateway.model_id, "bearer token" if gateway.token else "none")  # fmt: skip
        try:
            while not stop.wait(0.5) and gateway.batcher.error is None:
                pass
        finally:
            server.stop()
    if gateway.batcher.error is not None:  # its process goes down saying why; the supervisor restarts it
        raise gateway.batcher.error
    return gateway
