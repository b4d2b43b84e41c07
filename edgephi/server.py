"""`edgephi serve`: OpenAI's chat and completions API over HTTP, on Starlette and uvicorn (the
`serve` extra). One loaded model serves every request; each generation runs in a thread of its
own with a KV cache of its own, and hands its text to the event loop a piece at a time.

Limits answer in OpenAI's error format, never by failing: a body over max_body bytes gets 413, a
request while max_sessions generations run gets 429, a wrong or missing API key 401. A client that
goes away stops its generation at the next token and frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from . import __version__
from .errors import EdgephiError
from .generate import GenerationStats
from .tool_calls import parse_reply, template_takes_tools, with_tools
from .openai_protocol import (ApiError, GenerationRequest, ResponseIds, chat_chunk, chat_logprobs, chat_response,
                              completion_chunk, completion_logprobs, completion_response, error_body,
                              parse_chat_request, parse_completion_request, usage_chunk)

DEFAULT_MAX_SESSIONS = 4
DEFAULT_MAX_BODY = 1 << 20  # bytes: a long conversation's JSON, far below what would strain memory
DISCONNECT_POLL = 0.25  # seconds between checks for a vanished client while a reply is computed


def require_server_packages() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgephiError("edgephi serve needs its extra: pip install 'edgephi[serve]'") from None


class Slots:
    """How many generations may run at once; a request finding none free is refused (429)."""

    def __init__(self, size: int):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {size!r}")
        self.size, self.used = size, 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used == self.size:
                return False
            self.used += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.used -= 1


class Generation:
    """One request's text pieces, produced in a thread of its own. events() yields
    ("piece", text, logprobs), then ("end", "", logprobs) or ("error", exception, [])."""

    def __init__(self, pieces: Callable[[], Iterator[str]], stats: GenerationStats,
                 on_end: Callable[[bool], None]):
        """on_end(stopped): called in the thread when it is done; stopped if cancel() ended it early."""
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pieces, on_end), name="edgephi-request", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next token (a prompt being computed finishes first)."""
        self._cancelled.set()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self._cancelled.set()

    def _run(self, make_pieces, on_end) -> None:
        sent, stopped, last = 0, False, None
        try:
            pieces = make_pieces()
            try:
                for piece in pieces:
                    new = self.stats.logprobs[sent:]
                    sent += len(new)
                    self._put(("piece", piece, new))
                    if self._cancelled.is_set():
                        stopped = True
                        break
            finally:
                pieces.close()  # ends the token stream: its KV cache goes back to the model's pool
                del pieces
            last = ("end", "", self.stats.logprobs[sent:])
        except Exception as exc:  # noqa: BLE001  (reported to the client)
            last = ("error", exc, [])
        finally:
            on_end(stopped)  # before the client hears of the end: its next request finds the slot free
            if last is not None:
                self._put(last)

    async def events(self, disconnected: Callable[[], asyncio.Future] | None = None) -> AsyncIterator[tuple]:
        """The pieces as they come; when `disconnected()` (asked every DISCONNECT_POLL seconds)
        says the client left, cancel and stop."""
        loop = asyncio.get_running_loop()
        asked = loop.time()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    item = None
                if disconnected is not None and loop.time() - asked >= DISCONNECT_POLL:
                    if await disconnected():
                        return
                    asked = loop.time()
                if item is None:
                    continue
                yield item
                if item[0] != "piece":
                    return
        finally:
            self.cancel()  # a no-op after the end; else the client is gone or the response failed


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class ServerState:
    """What every request of one server shares."""

    def __init__(self, model, model_id: str, max_sessions: int, api_key: str | None, max_body: int):
        self.model, self.model_id, self.api_key, self.max_body = model, model_id, api_key, max_body
        self.slots = Slots(max_sessions)
        self.cancelled = 0  # generations stopped early because their client left
        self._count = threading.Lock()
        self.fingerprint = f"edgephi-{__version__}-{getattr(model.backend, 'isa', None) and model.backend.isa.name}"

    def generation_ended(self, stopped: bool) -> None:
        if stopped:
            with self._count:
                self.cancelled += 1
        self.slots.give_back()

    def check_key(self, headers) -> None:
        if self.api_key is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (Authorization: Bearer KEY)", kind="authentication_error",
                           code="invalid_api_key")

    async def read_json(self, request) -> object:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body is {length} bytes; this server takes at most {self.max_body}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"the request body is over {self.max_body} bytes, this server's limit",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def constraint(self, request: GenerationRequest):
        """The request's constraint, compiled (in a worker thread): a required or named tool's
        calls, its response_format's JSON, or None."""
        model = self.model
        if request.tools and request.tool_choice != "auto":
            name = None if request.tool_choice == "required" else request.tool_choice
            return _compiled(lambda: model.tool_call_constraint(request.tools, name, request.parallel_tool_calls),
                             "tools", "invalid_tools")
        if request.json_schema is not None:
            return _compiled(lambda: model.json_constraint(request.json_schema), "response_format",
                             "invalid_json_schema")
        return None

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (in a worker thread: templates and long texts take time)."""
        model = self.model
        param = "messages" if request.messages is not None else "prompt"
        try:
            if request.messages is not None:
                messages = request.messages
                if request.tools:
                    if not template_takes_tools(model.generation_config.get("chat_template")):
                        raise ApiError(400, f"tools: the chat template of '{self.model_id}' offers the model no "
                                       "tools (Phi-4-mini's does)", param="tools")
                    messages = with_tools(messages, request.tools)
                ids = model.chat_ids(messages)
            else:
                ids = model.prompt_ids(request.prompt)
                model.check_tokens(ids)
        except (ValueError, EdgephiError) as exc:
            raise ApiError(400, f"{param}: {exc}", param=param) from None
        if len(ids) >= model.context:
            raise ApiError(400, f"{param}: the prompt is {len(ids)} tokens; this model's context is {model.context}",
                           param=param, code="context_length_exceeded")
        return ids


def _compiled(build, param: str, code: str):
    """build()'s constraint; what the engine cannot compile is the request's fault (400), a
    missing engine the server's (501)."""
    try:
        return build()
    except ValueError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code=code) from None
    except EdgephiError as exc:
        raise ApiError(501, str(exc), param=param, kind="server_error") from None


def create_app(model, *, model_id: str | None = None, max_sessions: int = DEFAULT_MAX_SESSIONS,
               api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY):
    """The Starlette application serving `model` (a LanguageModel) under OpenAI's paths."""
    require_server_packages()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state = ServerState(model, model_id or model.folder.name, max_sessions, api_key, max_body)

    async def health(request):
        batcher = getattr(model.backend, "batcher", None)
        steps = {"decode_steps": batcher.steps, "decode_batches": batcher.batches} if batcher else {}
        return JSONResponse({"status": "ok", "model": state.model_id, "sessions": state.slots.used,
                             "max_sessions": state.slots.size, **steps})

    async def models(request):
        state.check_key(request.headers)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": 0, "owned_by": "edgephi",
             "context_length": model.context}]})

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    async def generate(request, chat: bool):
        state.check_key(request.headers)
        body = await state.read_json(request)
        parse = parse_chat_request if chat else parse_completion_request
        req = parse(body, state.model_id)
        if not state.slots.take():
            raise ApiError(429, f"all {state.slots.size} sessions are busy; retry shortly", kind="rate_limit_error",
                           code="too_many_sessions")
        try:
            ids = await asyncio.to_thread(state.prompt_ids, req)
            constraint = await asyncio.to_thread(state.constraint, req)
            stats = GenerationStats()
            max_tokens = model.context - len(ids) if req.max_tokens is None else req.max_tokens
            options = dict(max_new_tokens=max_tokens, stop=req.stop, stats=stats, logprobs=req.logprobs,
                           ignore_eos=req.ignore_eos, json_schema=constraint, **req.sampling)
            generation = Generation(lambda: model.stream_ids(ids, **options), stats, state.generation_ended)
        except BaseException:
            state.slots.give_back()
            raise
        response_ids = ResponseIds(state.model_id, state.fingerprint, chat)
        echo = model.tokenizer.decode(ids) if req.echo else ""
        if req.stream:
            events = _chat_events if chat else _completion_events
            return EventStream(events(generation, response_ids, req, model.tokenizer, echo), generation.cancel)
        return JSONResponse(await _whole(generation, response_ids, req, model.tokenizer, echo, request, chat))

    async def api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind=kind),
                            status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"),
                            status_code=500)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                        Exception: server_error})
    app.state.edgephi = state
    return app


async def _whole(generation: Generation, ids: ResponseIds, req: GenerationRequest, tokenizer, echo: str, request,
                 chat: bool) -> dict:
    """A non-streaming response, once the generation ends; a client gone meanwhile cancels it."""
    text, entries, ended = [], [], False
    async for kind, value, logprobs in generation.events(request.is_disconnected):
        if kind == "error":
            raise value
        text.append(value)
        entries += logprobs
        ended = kind == "end"
    if not ended:  # the client left: nobody reads this
        raise ApiError(499, "the client closed the request")
    content = echo + "".join(text)
    if chat:
        calls = None
        if req.tools:
            content, calls = parse_reply(content)
        return chat_response(ids, content, generation.stats,
                             chat_logprobs(tokenizer, entries) if req.logprobs is not None else None, calls)
    return completion_response(ids, content, generation.stats,
                               completion_logprobs(tokenizer, entries, len(echo)) if req.logprobs is not None
                               else None)


def _error_event(exc: Exception) -> bytes:
    if isinstance(exc, ApiError):
        return _sse(exc.body())
    if isinstance(exc, (ValueError, EdgephiError)):
        return _sse(error_body(str(exc)))
    return _sse(error_body(f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))


async def _chat_events(generation: Generation, ids: ResponseIds, req: GenerationRequest, tokenizer,
                       echo: str) -> AsyncIterator[bytes]:
    usage = req.include_usage
    yield _sse(chat_chunk(ids, {"role": "assistant", "content": ""}, with_usage=usage))
    if req.tools:  # a call is known only once its block is whole: the reply comes in one piece
        async for chunk in _chat_tool_events(generation, ids, req, tokenizer):
            yield chunk
        return

    def chunk(text, lp, finish):
        return chat_chunk(ids, {} if finish else {"content": text}, finish_reason=finish, logprobs=lp,
                          with_usage=usage)

    async for event in _pieces(generation, ids, req, chunk, lambda entries, text: chat_logprobs(tokenizer, entries)):
        yield event


async def _pieces(generation: Generation, ids: ResponseIds, req: GenerationRequest, chunk, logprobs_of
                  ) -> AsyncIterator[bytes]:
    """A generation's events as SSE: chunk(text, logprobs, finish_reason) per piece and at the
    end, then the usage chunk if asked for, then [DONE]; logprobs_of(entries, text) of each piece."""
    async for kind, value, logprobs in generation.events():
        lp = logprobs_of(logprobs, value) if req.logprobs is not None else None
        if kind == "piece":
            yield _sse(chunk(value, lp, None))
        elif kind == "end":
            yield _sse(chunk("", lp, generation.stats.finish_reason))
            if req.include_usage:
                yield _sse(usage_chunk(ids, generation.stats))
        else:
            yield _error_event(value)
    yield b"data: [DONE]\n\n"


async def _chat_tool_events(generation: Generation, ids: ResponseIds, req: GenerationRequest,
                            tokenizer) -> AsyncIterator[bytes]:
    usage = req.include_usage
    text, entries = [], []
    async for kind, value, logprobs in generation.events():
        if kind == "error":
            yield _error_event(value)
            yield b"data: [DONE]\n\n"
            return
        text.append(value)
        entries += logprobs
    content, calls = parse_reply("".join(text))
    lp = chat_logprobs(tokenizer, entries) if req.logprobs is not None else None
    if content:
        yield _sse(chat_chunk(ids, {"content": content}, logprobs=lp, with_usage=usage))
        lp = None
    if calls:
        delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        yield _sse(chat_chunk(ids, delta, logprobs=lp, with_usage=usage))
    finish = "tool_calls" if calls else generation.stats.finish_reason
    yield _sse(chat_chunk(ids, {}, finish_reason=finish, with_usage=usage))
    if usage:
        yield _sse(usage_chunk(ids, generation.stats))
    yield b"data: [DONE]\n\n"


async def _completion_events(generation: Generation, ids: ResponseIds, req: GenerationRequest, tokenizer,
                             echo: str) -> AsyncIterator[bytes]:
    usage = req.include_usage
    offset = [len(echo)]  # the text's length before the piece: its tokens' text_offset
    if echo:
        yield _sse(completion_chunk(ids, echo, with_usage=usage))

    def chunk(text, lp, finish):
        return completion_chunk(ids, text, finish_reason=finish, logprobs=lp, with_usage=usage)

    def logprobs_of(entries, text):
        lp = completion_logprobs(tokenizer, entries, offset[0])
        offset[0] += len(text)
        return lp

    async for event in _pieces(generation, ids, req, chunk, logprobs_of):
        yield event


class EventStream:
    """A server-sent event response that ends its generation however the stream ends: the client
    disconnecting (seen at the next write, or by the disconnect message while nothing is written)
    included."""

    def __init__(self, events: AsyncIterator[bytes], cancel: Callable[[], None]):
        self.events, self.cancel = events, cancel

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-stream
            pass
        finally:
            self.cancel()
            watcher.cancel()
            await self.events.aclose()


def loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), refused in one line when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgephiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def make_server(app, sock: socket.socket, log_level: str = "info"):
    """A uvicorn server for `app` on an already bound socket: server.run(sockets=[sock])."""
    require_server_packages()
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2)
    return uvicorn.Server(config)
