"""`lorafit serve`: one base model, many adapters, behind an OpenAI-compatible HTTP API (a thin edge over `decode`).

    GET  /v1/models                  the base and every adapter (vLLM's shape: adapters name the base as parent)
    POST /v1/completions             prompt -> text; tokenized as transformers does by default (special tokens added)
    POST /v1/chat/completions        messages -> reply, rendered with the chosen adapter's chat template
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: add an adapter at run time (vLLM's endpoint)
    POST /v1/unload_lora_adapter     {"lora_name"}: drop it

The request's "model" picks the adapter (the base's id: no adapter). stream, temperature, top_p, max_tokens, stop,
seed and usage behave as OpenAI documents them.

Mixed-adapter batching: one worker thread owns the model. It waits for a request, gathers every request that arrives
within `batch_wait` (up to `max_batch`), and decodes them together: one forward pass per step for the batch, each
row through its own adapter (`AdapterBank.rows`) and its own sampling settings. A greedy answer is the same served
alone or in a mixed batch. Requests arriving while a batch runs form the next batch.

Bad requests (unknown model, malformed JSON, a prompt longer than the context, a folder that is no adapter ...) get
an OpenAI-style error, {"error": {"message", "type", "param", "code"}}, with a 4xx status; the server keeps serving.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the routes' annotations at run time
import errno
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.generate import Completion, Sampling, check_sampling, decode

DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM
UNSUPPORTED = {"n": lambda v: v in (None, 1), "best_of": lambda v: v in (None, 1), "echo": lambda v: not v,
               "logprobs": lambda v: not v, "suffix": lambda v: not v, "tools": lambda v: not v}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error `kind`, the offending `param`."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Job:
    """One request for the worker: prompt ids, settings, adapter (None: base); results come back through `future`
    (a Completion plus the batch size it ran in) and, when streaming, `on_text`."""

    prompt: list[int]
    sampling: Sampling
    adapter: str | None
    stop_ids: list[int]
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)


class Engine:
    """The loaded base, its adapters (an `AdapterBank`), and the batching worker thread."""

    def __init__(self, source: Path, adapters: dict[str, Path], max_batch: int = 16, batch_wait: float = 0.01):
        from lorafit.generate import open_bank
        from lorafit.sources import load_source_tokenizer, resolve_source, stop_token_ids

        self.src = resolve_source(Path(source), allow_model=True)
        self.tokenizer = load_source_tokenizer(self.src)
        self.model, self.bank, named = open_bank(self.src, adapters)
        self.base_id = self.src.model.path
        self.tokenizers = {None: self.tokenizer}
        self.sources = {None: self.src}
        for name, folder in named.items():
            self._remember(name, resolve_source(folder))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.completion_stops = stop_token_ids(self.tokenizer, self.src)
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.lock = threading.Lock()  # the model: one batch, or one adapter load, at a time
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._work, name="lorafit-batcher", daemon=True).start()

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

    def load(self, name: Any, path: Any) -> None:
        """Add an adapter at run time. Raises ApiError 400: bad name or path, an adapter of another base."""
        from lorafit.evaluate import add_adapter
        from lorafit.merge import check_same_base
        from lorafit.sources import resolve_source

        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
            raise ApiError(400, "give lora_name and lora_path, both non-empty strings", param="lora_name")
        if name == self.base_id or name in self.bank.names:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            src = resolve_source(Path(path))
            check_same_base([self.sources[None] if self.src.adapter_dir else self._base_source(), src])
            with self.lock:
                add_adapter(self.bank, name, src.adapter_dir)
        except LorafitError as e:
            raise ApiError(400, f"lora_path {path}: {e}", param="lora_path") from None
        self._remember(name, src)

    def _base_source(self):
        from lorafit.generate import _as_base

        return _as_base(self.src)

    def unload(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self.bank.names:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
        with self.lock:
            self.bank.remove(name)
        self.sources.pop(name, None)
        self.tokenizers.pop(name, None)

    # -- requests

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.lock, self.bank.rows([job.adapter for job in batch]):
                completions = decode(self.model, self.tokenizer, [j.prompt for j in batch],
                                     [j.sampling for j in batch], [],
                                     on_text=lambda i, text: batch[i].on_text and batch[i].on_text(text))
            self.batches += 1
            for job, completion in zip(batch, completions, strict=True):
                job.future.set_result((completion, len(batch)))
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, the worker goes on
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)


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


def build_job(engine: Engine, body: dict, chat: bool) -> tuple[Job, str]:
    """The Job a /v1/completions or /v1/chat/completions body asks for, and the model id to answer with.

    Raises:
        ApiError: a missing or unknown model, a malformed field, an unsupported option, or a prompt that does not
            fit the context with its max_tokens.
    """
    from lorafit.data import end_token_ids

    if "model" not in body:
        raise ApiError(400, "model: required (the base's id or an adapter name; see GET /v1/models)", param="model")
    adapter = engine.adapter_of(body["model"])
    for key, ok in UNSUPPORTED.items():
        if key in body and not ok(body[key]):
            raise ApiError(400, f"{key}: {body[key]!r} is not supported by lorafit serve", param=key)
    tokenizer, src = engine.tokenizers[adapter], engine.sources[adapter]
    prompt = _chat_prompt(tokenizer, body) if chat else _completion_prompt(tokenizer, body)
    if chat:
        template = src.config.data.chat_template if src.config is not None else None
        stop_ids = sorted(end_token_ids(tokenizer, template, chat=True))
    else:
        stop_ids = engine.completion_stops
    room = engine.context - len(prompt)
    limit = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    key = "max_tokens" if not chat or "max_completion_tokens" not in body else "max_completion_tokens"
    default = max(room, 1) if chat else DEFAULT_MAX_TOKENS
    max_tokens = _number({key: limit}, key, default, int, low=1)
    if len(prompt) + max_tokens > engine.context:
        raise ApiError(400, f"This model's maximum context length is {engine.context} tokens. However, you requested "
                            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
    seed = _number(body, "seed", None, int)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, low=0, high=2),
                        top_p=_number(body, "top_p", 1.0, low=0, high=1), seed=seed, stop=_stop_strings(body),
                        stop_ids=stop_ids)
    try:
        check_sampling(sampling)
    except LorafitError as e:
        raise ApiError(400, str(e), param="top_p") from None
    return Job(prompt, sampling, adapter, stop_ids), body["model"]


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
            "lorafit": {"batch_rows": rows}}  # how many requests shared this one's forward passes


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


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application around `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorafit serve")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):
        kind = "NotFoundError" if e.status_code == 404 else "BadRequestError"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            error = ApiError(401, "Incorrect API key provided (send Authorization: Bearer KEY).",
                             "AuthenticationError")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": engine.base_id, "object": "model", "created": now, "owned_by": "lorafit",
                 "root": engine.base_id, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "lorafit",
                  "root": str(engine.sources[n].path), "parent": engine.base_id} for n in engine.bank.names]
        return {"object": "list", "data": data}

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        job, model = build_job(engine, body, chat)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, job, model, chat, include_usage), media_type="text/event-stream")
        completion, rows = await asyncio.wrap_future(engine.submit(job))
        return _response(completion, model, chat, rows)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await body_of(request)
        await asyncio.to_thread(engine.load, body.get("lora_name"), body.get("lora_path"))
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await body_of(request)
        await asyncio.to_thread(engine.unload, body.get("lora_name"))
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    return app


async def _stream(engine: Engine, job: Job, model: str, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per piece of text as the worker produces it, the finish reason, usage, [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    future = asyncio.wrap_future(engine.submit(job))
    future.add_done_callback(lambda _: pieces.put_nowait(None))
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if chat:
        yield _chunk(ident, model, chat, None, None, first=True)
    while (text := await pieces.get()) is not None:
        yield _chunk(ident, model, chat, text, None)
    while not pieces.empty():  # text queued just before the end
        text = pieces.get_nowait()
        if text:
            yield _chunk(ident, model, chat, text, None)
    try:
        completion, _ = future.result()
    except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in the stream
        yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}', 'InternalServerError').body())}\n\n"
        return
    yield _chunk(ident, model, chat, None, completion.finish_reason)
    if include_usage:
        usage = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": int(time.time()), "model": model, "choices": [], "usage": _usage(completion)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


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


def serve_command(source: Path, adapters: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                  api_key: str | None = None, max_batch: int = 16, batch_wait: float = 0.01, console=None) -> None:
    """`lorafit serve`: bind, load the base once with every adapter, and answer until interrupted.

    Raises:
        LorafitError: the web extra is missing, the port is busy, or an adapter cannot be loaded (exit 2).
    """
    from rich.console import Console

    console = console or Console(highlight=False)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401 - the optional [serve] extra
    except ImportError:
        raise LorafitError('lorafit serve needs the serve extra: pip install "lorafit[serve]" (fastapi, uvicorn)') \
            from None
    import uvicorn

    sock = bind(host, port)
    engine = Engine(source, adapters, max_batch=max_batch, batch_wait=batch_wait)
    console.print(f"serving {engine.base_id} with adapters {', '.join(engine.bank.names) or '(none)'} on "
                  f"http://{host}:{port}/v1 (OpenAI-compatible; Ctrl+C stops)")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="warning"))
    server.run(sockets=[sock])
