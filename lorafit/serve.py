"""`lorafit serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API (a thin edge over the engine).

    GET  /v1/models                  the base and every adapter (vLLM's shape: adapters name the base as parent)
    POST /v1/completions             prompt -> text; tokenized as transformers does by default (special tokens added)
    POST /v1/chat/completions        messages -> reply, rendered with the chosen adapter's chat template
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: add an adapter at run time (vLLM's endpoint)
    POST /v1/unload_lora_adapter     {"lora_name"}: drop it
    GET  /health                     200 {"status": "ok"} while the engine runs (no key needed)
    GET  /metrics                    Prometheus text: requests by status, running / waiting, tokens in and out,
                                     time to first token, time per output token, adapter swaps

The request's "model" picks the adapter (the base's id: no adapter); with the base's id a body may carry LoRAX's
"merged_adapters": {"ids": [...], "weights": [...], "merge_strategy": "linear"}: base + Σ wᵢ·ΔWᵢ, decoded in the same
batch as everything else (OpenAI clients send it with extra_body). stream, temperature, top_p, max_tokens, stop, seed
and usage behave as OpenAI documents them; vLLM's "ignore_eos" too.

Scheduling is the engine's (`lorafit.inference.engine`): requests join the running batch at the next step and leave
when they end. `--max-loras` bounds the adapters in the model (and in one step); `--max-queue` the requests waiting
(more get 429 with Retry-After). A client that disconnects frees its row at the next step.

Bad requests (unknown model, malformed JSON, a prompt longer than the context, a folder that is no adapter ...) get
an OpenAI-style error, {"error": {"message", "type", "param", "code"}}, with a 4xx status; the server keeps serving.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the routes' annotations at run time
import errno
import hmac
import ipaddress
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.inference.engine import Cancelled, Request
from lorafit.inference.sampling import Completion, Sampling, check_sampling

DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM
UNSUPPORTED = {"n": lambda v: v in (None, 1), "best_of": lambda v: v in (None, 1), "echo": lambda v: not v,
               "logprobs": lambda v: not v, "suffix": lambda v: not v, "tools": lambda v: not v}
MERGE_STRATEGIES = ("linear",)
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error `kind`, the offending `param`, extra headers."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Job:
    """One parsed request: prompt ids, settings, adapters ({name: weight}; None: the base), the model to answer as."""

    prompt: list[int]
    sampling: Sampling
    adapters: dict[str, float] | None
    model: str


class Service:
    """The loaded base, its adapters (an `AdapterBank`), the engine and the thread that steps it."""

    def __init__(self, source: Path, adapters: dict[str, Path], max_batch: int = 32, batch_wait: float = 0.01,
                 max_loras: int | None = None, max_queue: int | None = None, adapter_root: Path | None = None,
                 prefill_chunk: int = 256, threads: int | None = None):
        from lorafit.inference.engine import Engine
        from lorafit.inference.load import open_bank
        from lorafit.sources import load_source_tokenizer, resolve_source, stop_token_ids

        self.src = resolve_source(Path(source), allow_model=True)
        self.tokenizer = load_source_tokenizer(self.src)
        self.model, self.bank, named = open_bank(self.src, adapters)
        if max_loras is not None:
            self.bank.limit(max_loras)
        self.base_id = self.src.model.path
        self.tokenizers = {None: self.tokenizer}
        self.sources = {None: self.src}
        for name, folder in named.items():
            self._remember(name, resolve_source(folder))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.completion_stops = stop_token_ids(self.tokenizer, self.src)
        self.max_queue, self.batch_wait = max_queue, batch_wait
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.engine = Engine(self.model, self.tokenizer, self.bank, max_rows=max_batch, prefill_chunk=prefill_chunk,
                             max_loras=max_loras, stop_ids=self.completion_stops)
        self.lock = threading.Lock()  # the model: one engine step, or one adapter load, at a time
        self.metrics = None
        self.threads = threads
        threading.Thread(target=self._work, name="lorafit-engine", daemon=True).start()

    def _work(self) -> None:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per thread: set it where the model runs
        engine = self.engine
        with torch.no_grad():
            while True:
                with engine.wake:
                    idle = not engine.busy()
                    while not engine.busy():
                        engine.wake.wait()
                if idle and self.batch_wait > 0:
                    time.sleep(self.batch_wait)  # from idle: let requests sent together start together
                try:
                    with self.lock:
                        engine.step()
                except Exception as e:  # noqa: BLE001 - the worker must outlive any one step's failure
                    print(f"error: engine step failed: {e.__class__.__name__}: {e}", file=sys.stderr, flush=True)

    # -- adapters

    def _remember(self, name: str, src) -> None:
        from lorafit.sources import load_source_tokenizer

        self.sources[name] = src
        self.tokenizers[name] = load_source_tokenizer(src) if src.adapter_dir is not None else self.tokenizer

    def adapter_of(self, model: Any) -> str | None:
        """The adapter a request's "model" names (None: the base). Raises ApiError 404 for an unknown one."""
        if model == self.base_id:
            return None
        if isinstance(model, str) and model in self.bank.names:
            return model
        known = ", ".join([self.base_id, *self.bank.names])
        raise ApiError(404, f"The model `{model}` does not exist (served: {known}).", "NotFoundError", "model")

    def check_root(self, path: str) -> Path:
        """`path` resolved; ApiError 403 when `--adapter-root` is set and it lies outside (whether or not it exists)."""
        resolved = Path(path).expanduser().resolve()
        if self.adapter_root is not None and not resolved.is_relative_to(self.adapter_root):
            raise ApiError(403, "lora_path: outside the adapter root this server may read (--adapter-root)",
                           "PermissionDeniedError", "lora_path")
        return resolved

    def load(self, name: Any, path: Any) -> None:
        """Add an adapter at run time. Raises ApiError 400: bad name or path, an adapter of another base; 403: a path
        outside --adapter-root."""
        from lorafit.inference.load import add_adapter
        from lorafit.merge import check_same_base
        from lorafit.sources import resolve_source

        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
            raise ApiError(400, "give lora_name and lora_path, both non-empty strings", param="lora_name")
        folder = self.check_root(path)
        if name == self.base_id or name in self.bank.names:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            src = resolve_source(folder)
            check_same_base([self.sources[None] if self.src.adapter_dir else self._base_source(), src])
            with self.lock:
                add_adapter(self.bank, name, src.adapter_dir)
        except LorafitError as e:
            raise ApiError(400, f"lora_path {path}: {e}", param="lora_path") from None
        self._remember(name, src)

    def _base_source(self):
        from lorafit.inference.load import as_base

        return as_base(self.src)

    def unload(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self.bank.names:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
        with self.lock:
            if any(name in (row.request.adapters or {}) for row in self.engine.slots if row is not None):
                raise ApiError(409, f"The lora adapter '{name}' is decoding requests now; try again when they end.",
                               "ConflictError", "lora_name")
            self.bank.remove(name)
        self.sources.pop(name, None)
        self.tokenizers.pop(name, None)

    # -- requests

    def submit(self, job: Job, on_text=None) -> tuple[Request, Future]:
        """Queue a job for the engine. Raises ApiError 429 when `max_queue` requests already wait."""
        future: Future = Future()

        def done(completion, error):
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(completion)

        request = Request(job.prompt, job.sampling, job.adapters, on_text, done)
        with self.engine.wake:
            if self.max_queue is not None and len(self.engine.waiting) >= self.max_queue:
                raise ApiError(429, f"The server is busy: {len(self.engine.waiting)} requests are waiting "
                                    f"(--max-queue {self.max_queue}); retry after {RETRY_AFTER_S} s.",
                               "RateLimitError", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.engine.waiting.append(request)
            self.engine.wake.notify()
        return request, future


# ------------------------------------------------------------------------------------------ request parsing


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{key}: {value} is out of range [{low}, {high if high is not None else '∞'}]", param=key)
    return kind(value)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop: expected a string or a list of strings", param="stop")
    return stop


def build_job(service: Service, body: dict, chat: bool) -> Job:
    """The Job a /v1/completions or /v1/chat/completions body asks for.

    Raises:
        ApiError: a missing or unknown model, a malformed field or merged_adapters, an unsupported option, or a prompt
            that does not fit the context with its max_tokens.
    """
    from lorafit.data import end_token_ids
    from lorafit.sources import saved_stop_ids

    if "model" not in body:
        raise ApiError(400, "model: required (the base's id or an adapter name; see GET /v1/models)", param="model")
    adapter = service.adapter_of(body["model"])
    mix = merged_adapters(service, body) if "merged_adapters" in body else None
    for key, ok in UNSUPPORTED.items():
        if key in body and not ok(body[key]):
            raise ApiError(400, f"{key}: {body[key]!r} is not supported by lorafit serve", param=key)
    own = adapter if mix is None else next(iter(mix))  # the tokenizer and template: the (first) adapter's
    tokenizer, src = service.tokenizers[own], service.sources[own]
    prompt = _chat_prompt(tokenizer, body) if chat else _completion_prompt(tokenizer, body)
    if chat:
        template = src.config.data.chat_template if src.config is not None else None
        stop_ids = sorted(end_token_ids(tokenizer, template, chat=True) | saved_stop_ids(src))
    else:
        stop_ids = service.completion_stops
    if body.get("ignore_eos"):  # vLLM's extension (benchmarks): only max_tokens or a stop string ends the answer
        stop_ids = []
    room = service.context - len(prompt)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))  # the newer name, which load tools send too
    key = "max_tokens" if "max_completion_tokens" not in body else "max_completion_tokens"
    default = max(room, 1) if chat else DEFAULT_MAX_TOKENS
    max_tokens = _number({key: limit}, key, default, int, low=1)
    if len(prompt) + max_tokens > service.context:
        raise ApiError(400, f"This model's maximum context length is {service.context} tokens. However, you "
                            f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} "
                            f"in the completion). Please reduce the prompt or max_tokens.", param="max_tokens")
    seed = _number(body, "seed", None, int)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, low=0, high=2),
                        top_p=_number(body, "top_p", 1.0, low=0, high=1), seed=seed, stop=_stop_strings(body),
                        stop_ids=stop_ids)
    try:
        check_sampling(sampling)
    except LorafitError as e:
        raise ApiError(400, str(e), param="top_p") from None
    return Job(prompt, sampling, mix if mix is not None else ({adapter: 1.0} if adapter else None), body["model"])


def merged_adapters(service: Service, body: dict) -> dict[str, float]:
    """LoRAX's "merged_adapters" as {name: weight}: the row's update is Σ wᵢ·ΔWᵢ (merge_strategy linear).

    Raises:
        ApiError: "model" is not the base's id, a malformed field, an unknown adapter (404), one that cannot be
            composed linearly (not plain LoRA), or more adapters than --max-loras.
    """
    from lorafit.adapters.multi import stackable

    spec, param = body["merged_adapters"], "merged_adapters"
    if body.get("model") != service.base_id:
        raise ApiError(400, f"merged_adapters: \"model\" must be the base's id ({service.base_id}), not "
                            f"{body.get('model')!r}", param="model")
    if not isinstance(spec, dict) or set(spec) - {"ids", "weights", "merge_strategy", "density", "majority_sign_method"}:
        raise ApiError(400, "merged_adapters: expected {\"ids\": [...], \"weights\": [...], \"merge_strategy\": "
                            "\"linear\"}", param=param)
    ids, weights = spec.get("ids"), spec.get("weights")
    strategy = spec.get("merge_strategy", "linear")
    if strategy not in MERGE_STRATEGIES:
        raise ApiError(400, f"merged_adapters.merge_strategy: {strategy!r} is not supported (supported: "
                            f"{', '.join(MERGE_STRATEGIES)})", param=param)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise ApiError(400, "merged_adapters.ids: expected a non-empty list of distinct adapter names", param=param)
    if weights is None:
        weights = [1.0] * len(ids)
    if (not isinstance(weights, list) or len(weights) != len(ids)
            or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights)):
        raise ApiError(400, f"merged_adapters.weights: expected {len(ids)} numbers, one per id (got {weights!r})",
                       param=param)
    for name in ids:
        if name not in service.bank.names:
            raise ApiError(404, f"merged_adapters: the adapter `{name}` does not exist (loaded: "
                                f"{', '.join(service.bank.names) or 'none'}).", "NotFoundError", param)
        layers = [m.adapters.get(name) for m in service.bank.layers.values()] + list(
            service.bank.parked.get(name, {}).values())
        if any(layer is not None and not stackable(getattr(layer, "layer", layer)) for layer in layers):
            raise ApiError(400, f"merged_adapters: `{name}` is not a plain LoRA adapter; only LoRA (rsLoRA, LoRA-FA) "
                                f"adapters compose linearly", param=param)
    if service.engine.max_loras is not None and len(ids) > service.engine.max_loras:
        raise ApiError(400, f"merged_adapters: {len(ids)} adapters, more than --max-loras "
                            f"{service.engine.max_loras} in one step", param=param)
    return {name: float(w) for name, w in zip(ids, weights, strict=True)}


def _completion_prompt(tokenizer, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt: expected a non-empty string (one prompt per request)", param="prompt")
    return list(tokenizer(prompt)["input_ids"])  # special tokens added, as transformers and vLLM do by default


def _chat_prompt(tokenizer, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "messages: expected a non-empty list of {\"role\": str, \"content\": str}",
                       param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own BOS


# ------------------------------------------------------------------------------------------ responses


def _usage(completion: Completion) -> dict[str, int]:
    done = len(completion.token_ids) + (1 if completion.finish_reason == "stop" else 0)  # the stop token counts
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": done,
            "total_tokens": completion.prompt_tokens + done}


def _choice(completion: Completion, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": 0, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason, "logprobs": None}
    return {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}


def _response(completion: Completion, model: str, chat: bool, rows: int) -> dict[str, Any]:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model,
            "choices": [_choice(completion, chat)], "usage": _usage(completion),
            "lorafit": {"batch_rows": rows}}  # the most requests that shared one of this one's decode steps


def _chunk(ident: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


# ------------------------------------------------------------------------------------------ the app


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no global state)."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lorafit_requests", "Requests answered, by HTTP status.", ["status"], registry=registry)
        Gauge("lorafit_requests_running", "Requests decoding now.", registry=registry).set_function(
            lambda: service.engine.running)
        Gauge("lorafit_requests_waiting", "Requests waiting for a slot.", registry=registry).set_function(
            lambda: len(service.engine.waiting))
        Gauge("lorafit_engine_steps", "Engine iterations since start.", registry=registry).set_function(
            lambda: service.engine.steps)
        self.prompt_tokens = Counter("lorafit_prompt_tokens", "Prompt tokens read.", registry=registry)
        self.generation_tokens = Counter("lorafit_generation_tokens", "Tokens generated.", registry=registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lorafit_time_to_first_token_seconds", "Arrival to first token.", buckets=buckets,
                              registry=registry)
        self.tpot = Histogram("lorafit_time_per_output_token_seconds", "Mean time between output tokens.",
                              buckets=buckets, registry=registry)
        self.swaps = Counter("lorafit_adapter_swaps", "Adapters swapped into the model from the CPU.",
                             registry=registry)
        self.swaps_seen = 0
        self.service = service

    def finished(self, request: Request, completion: Completion) -> None:
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generation_tokens.inc(len(completion.token_ids))
        if request.first_token is not None:
            self.ttft.observe(request.first_token - request.arrived)
            if request.finished is not None and len(completion.token_ids) > 1:
                self.tpot.observe((request.finished - request.first_token) / (len(completion.token_ids) - 1))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        swaps = self.service.bank.swaps
        self.swaps.inc(swaps - self.swaps_seen)
        self.swaps_seen = swaps
        return generate_latest(self.registry)


class _Edge:
    """ASGI middleware: the API key (compared in constant time; /health needs none), requests counted by status, and
    one access-log line per request on stderr. Plain ASGI, so endpoints still see the client disconnect."""

    def __init__(self, app, expected: bytes | None, metrics: Metrics):
        self.app, self.expected, self.metrics = app, expected, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        start, status = time.monotonic(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        given = dict(scope["headers"]).get(b"authorization", b"")
        if (self.expected is not None and scope["path"] != "/health"
                and not hmac.compare_digest(given, self.expected)):
            error = ApiError(401, "Incorrect API key provided (send Authorization: Bearer KEY).", "AuthenticationError")
            await JSONResponse(error.body(), status_code=401)(scope, receive, send_status)
        else:
            await self.app(scope, receive, send_status)
        if scope["path"].startswith("/v1/"):
            self.metrics.requests.labels(str(status[0])).inc()
        client = scope["client"][0] if scope.get("client") else "-"
        print(f'{client} "{scope["method"]} {scope["path"]}" {status[0]} {time.monotonic() - start:.3f}s',
              file=sys.stderr, flush=True)  # the access log: one line a request


def create_app(service: Service, api_key: str | None = None):
    """The FastAPI application around `service`."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorafit serve")
    metrics = service.metrics = Metrics(service)
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: HttpRequest, e: HTTPException):
        kind = "NotFoundError" if e.status_code == 404 else "BadRequestError"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    app.add_middleware(_Edge, expected=expected, metrics=metrics)

    async def body_of(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": service.engine.running, "waiting": len(service.engine.waiting)}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": service.base_id, "object": "model", "created": now, "owned_by": "lorafit",
                 "root": service.base_id, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "lorafit",
                  "root": str(service.sources[n].path), "parent": service.base_id} for n in service.bank.names]
        return {"object": "list", "data": data}

    async def complete(request: HttpRequest, chat: bool):
        body = await body_of(request)
        job = build_job(service, body, chat)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(service, job, chat, include_usage), media_type="text/event-stream")
        engine_request, future = service.submit(job)
        completion = await _until_done(service, request, engine_request, future)
        metrics.finished(engine_request, completion)
        return _response(completion, job.model, chat, engine_request.batch_rows)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HttpRequest):
        body = await body_of(request)
        await asyncio.to_thread(service.load, body.get("lora_name"), body.get("lora_path"))
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HttpRequest):
        body = await body_of(request)
        await asyncio.to_thread(service.unload, body.get("lora_name"))
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    return app


async def _until_done(service: Service, http_request, request: Request, future: Future) -> Completion:
    """The completion, watching the client meanwhile: one that disconnects cancels its row (freed at the next step).

    Raises:
        ApiError: the generation failed (500) or was cancelled (499, nobody is listening).
    """
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.1)
        if done:
            break
        if await http_request.is_disconnected():
            service.engine.cancel(request)
            raise ApiError(499, "the client closed the request", "ClientClosedRequest")
    try:
        return waiting.result()
    except Cancelled:
        raise ApiError(499, "the client closed the request", "ClientClosedRequest") from None
    except Exception as e:  # noqa: BLE001 - this request failed; the others go on
        raise ApiError(500, f"generation failed: {e}", "InternalServerError") from None


async def _stream(service: Service, job: Job, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text as the engine produces it, the finish reason, usage, [DONE].
    A client that goes away closes this generator: its row is cancelled and leaves at the next step."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    request, future = service.submit(job, on_text=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    model = job.model
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        if chat:
            yield _chunk(ident, model, chat, None, None, first=True)
        while (text := await pieces.get()) is not None:
            yield _chunk(ident, model, chat, text, None)
        while not pieces.empty():  # text queued just before the end
            text = pieces.get_nowait()
            if text:
                yield _chunk(ident, model, chat, text, None)
        try:
            completion = future.result()
        except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in the stream
            yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}', 'InternalServerError').body())}\n\n"
            return
        service.metrics.finished(request, completion)
        yield _chunk(ident, model, chat, None, completion.finish_reason)
        if include_usage:
            usage = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "choices": [], "usage": _usage(completion)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not future.done():
            service.engine.cancel(request)  # the client went away mid-stream


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before any weights load so a busy port fails at once.

    Raises:
        LorafitError: the port is in use or the address cannot be bound (exit 2).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LorafitError(f"--port {port}: already in use on {host}; stop what listens there or choose another "
                               f"port (e.g. --port {port + 1})") from None
        raise LorafitError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, runtime_loading: bool) -> None:
    """Raises LorafitError (exit 2) for a server reachable from other machines that would let anyone load adapters
    (read folders on this machine) without a key."""
    if runtime_loading and api_key is None and not is_loopback(host):
        raise LorafitError(f"--host {host}: other machines could load adapters from this machine's disk through "
                           f"/v1/load_lora_adapter with no key; give --api-key KEY (and --adapter-root DIR to limit "
                           f"what may be read), or --no-runtime-loading to serve only the adapters named at start")


def serve_command(source: Path, adapters: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                  api_key: str | None = None, max_batch: int = 32, batch_wait: float = 0.01,
                  max_loras: int | None = None, max_queue: int | None = None, adapter_root: Path | None = None,
                  runtime_loading: bool = True, prefill_chunk: int = 256, threads: int | None = None,
                  console=None) -> None:
    """`lorafit serve`: bind, load the base once with every adapter, and answer until interrupted.

    Raises:
        LorafitError: the serve extra is missing, an exposed server without a key, the port is busy, an adapter
            cannot be loaded, or an --adapter-root that is no folder (exit 2).
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401 - the optional [serve] extra
    except ImportError:
        raise LorafitError('lorafit serve needs the serve extra: pip install "lorafit[serve]" (fastapi, uvicorn, '
                           'prometheus_client)') from None
    import uvicorn

    check_exposure(host, api_key, runtime_loading)
    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise LorafitError(f"--adapter-root {adapter_root}: not a directory")
    sock = bind(host, port)
    import torch

    # one core stays free for HTTP, tokenizing and streaming (vLLM's CPU build reserves one the same way)
    threads = threads or max(1, torch.get_num_threads() - 1)
    torch.set_num_threads(threads)
    service = Service(source, adapters, max_batch=max_batch, batch_wait=batch_wait, max_loras=max_loras,
                      max_queue=max_queue, adapter_root=adapter_root, prefill_chunk=prefill_chunk, threads=threads)
    app = create_app(service, api_key)
    if not runtime_loading:
        app.router.routes = [r for r in app.router.routes
                             if getattr(r, "path", "") not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")]
    console.print(f"serving {service.base_id} with adapters {', '.join(service.bank.names) or '(none)'} on "
                  f"http://{host}:{port}/v1 (OpenAI-compatible; Ctrl+C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
