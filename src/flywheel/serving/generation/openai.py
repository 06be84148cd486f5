"""OpenAI-compatible endpoints of a LoRA project: POST /v1/chat/completions and /v1/completions.

The official `openai` client works against them unchanged (`base_url=http://HOST:PORT/v1`): the
request fields it sends (`model`, `messages` or `prompt`, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`, `stream_options`),
the answer objects (`chat.completion`, `text_completion`, their `.chunk` forms) and server-sent
events ending in `data: [DONE]` when `stream` is true. Errors come in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) with every wrong field listed under
`detail`, as the rest of the server names them.

The same limits as /v1/generate hold (prompt characters and tokens, new tokens, temperature,
body size, the generation slots: at most `max_concurrent` at once per worker, `max_waiting`
queued, 429 beyond), the same metrics and JSON log lines. A stream holds its slot until its last
event; a client that goes away stops its generation within a token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flywheel.config import GenerateServingConfig
from flywheel.llm.runtime import Generation, NoChatTemplate, TextGenerator
from flywheel.serving.generation.openapi import MAX_SEED, MIN_TEMPERATURE
from flywheel.serving.http.bodies import parse_json_body, read_body
from flywheel.serving.http.common import Call, client_address
from flywheel.serving.http.errors import FieldError, NotFound, RequestInvalid, TooBusy, Unavailable

log = logging.getLogger("flywheel.serving")

ROLES = {"system", "user", "assistant"}
# Fields an OpenAI client may send that change nothing here at their default value.
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False,
           "user": None, "best_of": 1, "logit_bias": None, "suffix": None, "parallel_tool_calls": None}
MAX_STOP_CHARS = 100  # each stop string is searched for at every new token
MAX_MESSAGES = 256
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", *NEUTRAL}


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    model: str
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


class ModelNotFound(NotFound):
    """A request for a model this server does not serve (OpenAI's `model_not_found`)."""

    code = "model_not_found"
    param = "model"


def openai_error(status: int, payload: dict[str, Any], exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The error body OpenAI's clients read: `{"error": {message, type, param, code}}`; an invalid
    request is a 400 naming its first field (`detail` lists every one)."""
    kind = ("rate_limit_error" if status == 429 else "server_error" if status >= 500
            else "invalid_request_error")
    if isinstance(exc, RequestInvalid):
        first = exc.errors[0]
        message = "; ".join(f"{_param(e) or 'body'}: {e.msg}" for e in exc.errors)
        return 400, {"error": {"message": message, "type": kind, "param": _param(first), "code": first.type},
                     "detail": payload["detail"]}
    code = exc.code if isinstance(exc, ModelNotFound) else None
    return status, {"error": {"message": str(payload["detail"]), "type": kind,
                              "param": getattr(exc, "param", None), "code": code}}


def parse_openai(body: Any, cfg: GenerateServingConfig, chat: bool) -> OpenAIRequest:
    """Validate a chat or completion body; every wrong field is named in one error."""
    if not isinstance(body, dict):
        raise RequestInvalid([FieldError(("body",), "a JSON object is required", "type_error")])
    errors: list[FieldError] = []
    allowed = COMMON | ({"messages"} if chat else {"prompt"})
    for extra in sorted(set(body) - allowed):
        errors.append(FieldError(("body", extra), "not supported by this server", "extra_forbidden"))
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            errors.append(FieldError(("body", name), f"only {neutral!r} is supported", "unsupported"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        errors.append(FieldError(("body", "model"), "the model's name, a string", "missing"))
    messages = _messages(body, errors, cfg) if chat else None
    prompt = None if chat else _prompt(body, errors, cfg)
    max_tokens = _max_tokens(body, errors, cfg)
    temperature, top_p, seed = _sampling(body, errors, cfg)
    stop = _stop(body.get("stop"), errors)
    stream, include_usage = _streaming(body, errors)
    if errors:
        raise RequestInvalid(errors)
    return OpenAIRequest(chat, str(model), messages, prompt, max_tokens, temperature, top_p, seed, stop,
                         stream, include_usage)


def _max_tokens(body: dict[str, Any], errors: list[FieldError], cfg: GenerateServingConfig) -> int:
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    value = cfg.default_max_new_tokens if limit is None else limit
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cfg.max_new_tokens:
        errors.append(FieldError(("body", "max_tokens"), f"an integer in [1, {cfg.max_new_tokens}]",
                                 "out_of_range"))
        return 1
    return value


def _sampling(body: dict[str, Any], errors: list[FieldError],
              cfg: GenerateServingConfig) -> tuple[float, float, int | None]:
    temperature = _float(body, errors, "temperature", 1.0, 0.0, min(2.0, cfg.max_temperature))
    if 0 < temperature < MIN_TEMPERATURE:
        errors.append(FieldError(("body", "temperature"), f"0 (greedy) or at least {MIN_TEMPERATURE}",
                                 "out_of_range"))
    top_p = _float(body, errors, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        errors.append(FieldError(("body", "top_p"), "must be in (0, 1]", "out_of_range"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        errors.append(FieldError(("body", "seed"), f"an integer in [0, {MAX_SEED}]", "type_error"))
        seed = None
    return temperature, top_p, seed


def _streaming(body: dict[str, Any], errors: list[FieldError]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        errors.append(FieldError(("body", "stream"), "true or false", "type_error"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        errors.append(FieldError(("body", "stream_options"), 'only {"include_usage": bool}', "type_error"))
        options = {}
    return bool(stream), bool(options.get("include_usage"))


def _messages(body: dict[str, Any], errors: list[FieldError],
              cfg: GenerateServingConfig) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        errors.append(FieldError(("body", "messages"), "a non-empty list of {role, content}", "missing"))
        return []
    if len(raw) > MAX_MESSAGES:  # each is templated: bounded before any work is done
        errors.append(FieldError(("body", "messages"), f"at most {MAX_MESSAGES} messages", "too_long"))
        return []
    out, chars = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            errors.append(FieldError(("body", "messages", i), "{role: system|user|assistant, content: "
                                     "a string}", "type_error"))
            continue
        chars += len(m["content"])
        out.append({"role": m["role"], "content": m["content"]})
    if chars > cfg.max_prompt_chars:
        errors.append(FieldError(("body", "messages"), f"at most {cfg.max_prompt_chars} characters in all",
                                 "too_long"))
    return out


def _prompt(body: dict[str, Any], errors: list[FieldError], cfg: GenerateServingConfig) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # the client may send one prompt as a list
    if not isinstance(prompt, str) or not prompt.strip():
        errors.append(FieldError(("body", "prompt"), "a non-empty string", "type_error"))
        return ""
    if len(prompt) > cfg.max_prompt_chars:
        errors.append(FieldError(("body", "prompt"), f"at most {cfg.max_prompt_chars} characters",
                                 "too_long"))
    return prompt


def _float(body: dict[str, Any], errors: list[FieldError], name: str, default: float, lo: float,
           hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        errors.append(FieldError(("body", name), f"a number in [{lo}, {hi}]", "out_of_range"))
        return default
    return float(value)


def _stop(raw: Any, errors: list[FieldError]) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or len(items) > 4 or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items):
        errors.append(FieldError(("body", "stop"), f"a string of 1 to {MAX_STOP_CHARS} characters or a "
                                 "list of at most 4", "type_error"))
        return ()
    return tuple(items)


class OpenAIEndpoints:
    """The two routes, on the GenerateEndpoint's runtime, slots, answers and metrics."""

    def __init__(self, endpoint: Any):
        self.base = endpoint  # serving.generation.app.GenerateEndpoint
        self.cfg: GenerateServingConfig = endpoint.cfg

    async def chat(self, request: Request, call: Call) -> Response | dict[str, Any]:
        return await self.handle(request, call, chat=True)

    async def completions(self, request: Request, call: Call) -> Response | dict[str, Any]:
        return await self.handle(request, call, chat=False)

    async def handle(self, request: Request, call: Call, chat: bool) -> Response | dict[str, Any]:
        model = self.base.runtime.current
        if model is None:
            raise Unavailable("no champion adapter is loaded yet")
        call.version = model.version
        req = parse_openai(parse_json_body(await read_body(request, self.cfg.max_body_bytes)), self.cfg, chat)
        if req.model not in (model.name, f"{model.name}:{model.version}"):
            raise ModelNotFound(f"the model '{req.model}' does not exist here; this server serves "
                                f"'{model.name}'")
        prompt_ids = await run_in_threadpool(self.tokens, model, req)  # templating: off the loop
        client = client_address(request)
        if req.stream:
            # The slot is taken inside the stream, never before it: a client that goes away before
            # the stream starts must not keep one (the generator would never run its `finally`).
            if self.base.slots.full(client):
                raise TooBusy(f"{self.cfg.max_concurrent} generation(s) running and "
                              f"{self.cfg.max_waiting} waiting: retry later")
            call.counted = True  # the stream counts itself when it ends
            return StreamingResponse(self.events(model, req, prompt_ids, call.request_id, call.started,
                                                 "chat_completions" if chat else "completions", client),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        async with self.base.slots.slot(client) as granted:
            if not granted:
                raise TooBusy(f"{self.cfg.max_concurrent} generation(s) running and "
                              f"{self.cfg.max_waiting} waiting: retry later")
            out = await run_in_threadpool(model.generate, prompt_ids, req.max_tokens, req.temperature,
                                          req.top_p, req.seed, req.stop)
        self.base.record(model, out, call.request_id, call.started)
        return answer(model, req, out, call.request_id)

    def tokens(self, model: TextGenerator, req: OpenAIRequest) -> list[int]:
        try:
            ids = (model.chat_prompt_tokens(req.messages or []) if req.chat
                   else model.prompt_tokens(req.prompt or ""))
        except NoChatTemplate as exc:
            raise RequestInvalid([FieldError(("body", "messages"), str(exc), "no_chat_template")]) from None
        field = "messages" if req.chat else "prompt"
        if len(ids) > self.cfg.max_prompt_tokens:
            raise RequestInvalid([FieldError(("body", field), f"{len(ids)} tokens; at most "
                                             f"{self.cfg.max_prompt_tokens}", "too_long")])
        if not ids:
            raise RequestInvalid([FieldError(("body", field), "has no tokens", "type_error")])
        return ids

    async def events(self, model: TextGenerator, req: OpenAIRequest, prompt_ids: list[int],
                     request_id: str, started: float, name: str, client: str = "") -> AsyncIterator[bytes]:
        """Server-sent events: the pieces as they come, a last chunk with the finish reason (and
        the usage when asked), then [DONE]. The slot is released when the stream ends or breaks."""
        cancel = threading.Event()
        status = 200
        try:
            async with self.base.slots.slot(client) as granted:
                if not granted:  # filled between the check and the stream's start
                    status = 429
                    yield sse({"error": {"message": "every generation slot is busy: retry later",
                                         "type": "rate_limit_error", "param": None, "code": None}})
                    return
                head = chunk(model, req, request_id, {"role": "assistant", "content": ""} if req.chat else "")
                yield sse(head)
                pieces: Iterator[str | Generation] = model.stream(
                    prompt_ids, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, cancel)
                out: Generation | None = None
                async for piece in iterate_in_threadpool(pieces):
                    if isinstance(piece, Generation):
                        out = piece
                    else:
                        yield sse(chunk(model, req, request_id, {"content": piece} if req.chat else piece))
                assert out is not None
                last = chunk(model, req, request_id, {} if req.chat else "", out.finish_reason)
                yield sse(last)
                if req.include_usage:
                    yield sse({**chunk(model, req, request_id, None), "choices": [], "usage": usage(out)})
                yield b"data: [DONE]\n\n"
            self.base.record(model, out, request_id, started)
        except Exception:  # generation failed after the stream began: it ends without [DONE]
            status = 500
            log.exception("generation failed", extra={"event": "request_error", "status": 500,
                                                       "request_id": request_id})
            raise
        except BaseException:  # the client went away: the task is cancelled
            status = 499
            raise
        finally:
            cancel.set()
            self.base.metrics.observe(name, status, model.version, time.perf_counter() - started)


def _param(error: FieldError) -> str | None:
    """The field as OpenAI names it: `messages.0`, `temperature` (None for the body itself)."""
    return ".".join(map(str, error.loc[1:])) or None


def usage(out: Generation) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def answer(model: TextGenerator, req: OpenAIRequest, out: Generation, request_id: str) -> dict[str, Any]:
    base = {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{request_id}", "created": int(time.time()),
            "model": model.name, "system_fingerprint": f"{model.name}:v{model.version}",
            "usage": usage(out)}
    if req.chat:
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
            "finish_reason": out.finish_reason}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}]}


def chunk(model: TextGenerator, req: OpenAIRequest, request_id: str, delta: Any,
          finish: str | None = None) -> dict[str, Any]:
    base = {"id": f"{'chatcmpl' if req.chat else 'cmpl'}-{request_id}", "created": int(time.time()),
            "model": model.name, "system_fingerprint": f"{model.name}:v{model.version}"}
    if req.chat:
        return {**base, "object": "chat.completion.chunk", "choices": [] if delta is None else [{
            "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**base, "object": "text_completion", "choices": [] if delta is None else [{
        "index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
