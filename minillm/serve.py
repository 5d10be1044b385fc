"""minillm serve model_path=outputs/sft_tiny/final [port=8000 host=127.0.0.1 max_batch=8]  (python -m minillm.serve)

An OpenAI-compatible HTTP API over a trained model (the `serve` extra: FastAPI and uvicorn), so any OpenAI client
(the `openai` package, Open WebUI, curl) can talk to it:

- `POST /v1/chat/completions`: `messages` through the chat template the model was trained with;
- `POST /v1/completions`: `prompt` text continued;
- `GET /v1/models`: the one model served (`model_name`, default: the folder's name), with its parameter count and
  context length;
- `GET /`: a chat page (minillm/serve.html: plain HTML and JavaScript, nothing fetched from elsewhere) that streams
  replies through `/v1/chat/completions`, with a system prompt, temperature, top-p, max tokens, stop and clear.

Sampling fields: `temperature` (0 = greedy), `top_p`, `max_tokens` (or `max_completion_tokens`), `stop`, `seed`,
`n`, `stream` (server-sent events, ending with `data: [DONE]`). A field the API does not know, a bad value or a
prompt the context cannot hold is HTTP 400 with an OpenAI-style JSON error, and the server goes on serving.

Concurrent requests are decoded together: one worker thread owns the model, takes the requests waiting (up to
`max_batch` rows; `n` counts as n rows) whose sampling settings are equal, and decodes them as one left-padded
batch on the KV cache (`minillm.generate.stream_rows`); each request gets its tokens as they come. A request that
arrives while a batch decodes joins the next one.
"""

import asyncio
import errno
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from minillm.cli import Command
from minillm.config import GenerationConfig

PAGE = Path(__file__).with_name("serve.html")  # the chat page at /


@dataclass
class ServeCommand:
    """`minillm serve` (conf/serve.yaml)."""

    model_path: str = "???"  # a final/ folder, an export or a training checkpoint
    model_name: Optional[str] = None  # the id /v1/models lists; default: the folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # rows decoded together
    max_tokens: int = 128  # default max_tokens of a request that gives none
    device: str = "auto"  # auto: CUDA, then MPS, then the CPU (minillm.device.best_device)
    dtype: str = "auto"
    compile: bool = False


class RequestError(ValueError):
    """A bad request: HTTP 400 with this message (and the offending field, `param`)."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


# ---- the requests the API takes (fields the OpenAI API defines that we serve) ----

COMMON = {"model", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
# Fields of the OpenAI API this server does not implement, taken when a client sends their neutral value.
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, None), "top_logprobs": (0,)}
NEUTRAL |= {
    "logit_bias": ({},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
}


def _number(body: dict, key: str, default, kind, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"'{key}' must be in [{low}, {high}], got {value}", key)
    return kind(value)


def sampling(body: dict, default_max_tokens: int) -> tuple[GenerationConfig, int]:
    """(GenerationConfig, n) from a request body's sampling fields (OpenAI's names and defaults)."""
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("'top_p' must be > 0", "top_p")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, int, 1)
    n = _number(body, "n", 1, int, 1, 16)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        stop=stop,
        seed=seed,
    )
    return config, n


def check_fields(body: Any, allowed: set[str], required: str) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] is not None and body[key] not in neutral:
            raise RequestError(f"'{key}' is not supported by this server (only {neutral[0]!r})", key)
    unknown = sorted(set(body) - allowed - set(NEUTRAL))
    if unknown:
        raise RequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; this server takes {', '.join(sorted(allowed))}",
            unknown[0],
        )
    if required not in body:
        raise RequestError(f"'{required}' is required", required)
    return body


def chat_messages(body: dict) -> list[dict]:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be text", "messages")
        out.append({"role": m["role"], "content": content})
    return out


# ---- the batching worker: one thread owns the model ----


@dataclass
class Job:
    prompt: Union[str, list[dict]]  # text, or a conversation
    prompt_tokens: int
    config: GenerationConfig
    n: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (choice, piece, finish, tokens) | Exception
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away

    def send(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody to tell
            self.cancelled.set()


class Batcher:
    def __init__(self, model, tokenizer, max_batch: int, start: bool = True) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = model.config.block_size
        self.queue: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue, not in the current batch (other settings)
        self.batches: list[int] = []  # rows per decoded batch (the benchmark reads it)
        if start:
            threading.Thread(target=self._run, name="minillm-batcher", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def next_batch(self) -> list[Job]:
        """The oldest waiting request and every other one with equal settings that fits in max_batch rows (a seeded
        sampled request alone)."""
        if not self.waiting:
            self.waiting.append(self.queue.get())
        while True:  # everything already waiting joins the choice
            try:
                self.waiting.append(self.queue.get_nowait())
            except queue.Empty:
                break
        first = self.waiting[0]  # the oldest request leads; equal sampling settings (length limit included) join it
        # A seeded sample decodes alone: its rows draw from one generator seeded by the request, so the reply is
        # the same whatever else is waiting (in a batch, rows draw from the generator in turn).
        # A left-padded batch is as long as its longest prompt: a request joins only if no member's reply would be
        # cut shorter than alone.
        alone = first.config.do_sample and first.config.seed is not None
        batch, rows, rest, longest = [], 0, [], first.prompt_tokens
        for job in self.waiting:
            fits = max(longest, job.prompt_tokens) + job.config.max_new_tokens <= self.context
            if not batch or (not alone and job.config == first.config and rows + job.n <= self.max_batch and fits):
                batch.append(job)
                rows += job.n
                longest = max(longest, job.prompt_tokens)
            else:
                rest.append(job)
        self.waiting = rest
        return batch

    def _run(self) -> None:
        while True:
            batch = self.next_batch()
            try:
                self._decode(batch)
            except Exception as e:  # reported to the requests of this batch; the worker goes on
                for job in batch:
                    job.send(e)

    def _decode(self, batch: list[Job]) -> None:
        owners = [(job, choice) for job in batch for choice in range(job.n)]  # row -> (request, choice index)
        self.batches.append(len(owners))
        prompts = [job.prompt for job, _ in owners]
        from minillm.generate import stream_rows

        events = stream_rows(self.model, self.tokenizer, prompts, batch[0].config)
        for row, piece, finish, tokens in events:
            job, choice = owners[row]
            job.send((choice, piece, finish, tokens))
            if all(j.cancelled.is_set() for j in batch):  # every client went away: stop decoding for nobody
                events.close()
                return


# ---- the app ----


def create_app(model, tokenizer, model_name: str, max_batch: int = 8, default_max_tokens: int = 128):
    """The FastAPI app serving `model` (tests build it directly; `minillm serve` runs it under uvicorn)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title=f"minillm: {model_name}")
    parameters = model.num_parameters()
    batcher = Batcher(model, tokenizer, max_batch)
    app.state.batcher = batcher
    context = model.config.block_size
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return JSONResponse(
            status_code=400,
            content={"error": {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": None}},
        )

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as e:
            raise RequestError(f"the request body is not JSON: {e}") from None

    def prompt_length(prompt) -> int:
        from minillm.tokenizer import apply_chat_template

        if isinstance(prompt, list):
            ids = apply_chat_template(tokenizer, prompt, add_generation_prompt=True).ids
        else:
            ids = tokenizer.encode(prompt)
        if len(ids) >= context:
            raise RequestError(
                f"the prompt is {len(ids)} tokens; this model's context is {context} tokens (prompt and reply): "
                "shorten it",
                "messages" if isinstance(prompt, list) else "prompt",
            )
        return len(ids)

    async def run(prompt, body: dict, kind: str):
        config, n = sampling(body, default_max_tokens)
        job = Job(prompt, prompt_length(prompt), config, n, asyncio.get_running_loop())
        batcher.submit(job)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(sse(job, ident, kind, body), media_type="text/event-stream")
        texts, finishes, counts = [""] * n, [None] * n, [0] * n
        try:
            while not all(finishes):
                event = await job.events.get()
                if isinstance(event, Exception):
                    return server_error(event)
                choice, piece, finish, counts[choice] = event
                texts[choice] += piece
                finishes[choice] = finish
        finally:  # done, or the client disconnected (the task is cancelled)
            job.cancelled.set()
        completion = sum(counts)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
            if kind == "chat"
            else {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finishes))
        ]
        tokens = {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion}
        tokens["total_tokens"] = tokens["prompt_tokens"] + completion
        return {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": tokens,
        }

    def server_error(exc: Exception):
        error = {"message": f"{type(exc).__name__}: {exc}", "type": "server_error", "param": None, "code": None}
        return JSONResponse(status_code=500, content={"error": error})

    async def sse(job: Job, ident: str, kind: str, body: dict):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        remaining = job.n

        def chunk(choice: int, piece: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                item = {"index": choice, "delta": delta, "finish_reason": finish}
            else:
                item = {"index": choice, "text": piece or "", "logprobs": None, "finish_reason": finish}
            data = {"id": ident, "object": obj, "created": int(time.time()), "model": model_name, "choices": [item]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        counts = [0] * job.n
        try:
            if kind == "chat":
                for choice in range(job.n):
                    yield chunk(choice, None, None, first=True)
            while remaining:
                event = await job.events.get()
                if isinstance(event, Exception):
                    error = {"message": f"{type(event).__name__}: {event}", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error | {'param': None, 'code': None}})}\n\n"
                    break
                choice, piece, finish, counts[choice] = event
                if piece:
                    yield chunk(choice, piece, None)
                if finish is not None:
                    yield chunk(choice, None, finish)
                    remaining -= 1
            if (body.get("stream_options") or {}).get("include_usage"):  # OpenAI's last chunk: usage, no choices
                usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": sum(counts)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                data = {"id": ident, "object": obj, "created": int(time.time()), "model": model_name, "choices": []}
                yield f"data: {json.dumps(data | {'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # done, or the client disconnected (the generator is closed)
            job.cancelled.set()

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "minillm"}
        entry |= {"parameters": parameters, "context_length": context}  # extra fields: the chat page shows them
        return {"object": "list", "data": [entry]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = check_fields(await body_of(request), CHAT_FIELDS, "messages")
        return await run(chat_messages(body), body, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = check_fields(await body_of(request), COMPLETION_FIELDS, "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be one string", "prompt")
        return await run(prompt, body, "completion")

    return app


def check_port(host: str, port: int) -> None:
    """Fail before loading anything when the port is taken, naming it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: old connections don't count
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"error: port {port} on {host} is in use (another server?): stop it or pass port=<free port>"
                ) from None
            raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}") from None


def run(command: ServeCommand) -> None:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "error: minillm serve needs the serve extra: pip install 'minillm-lab[serve]' "
            "(in a checkout: pip install -e '.[serve]')"
        ) from None
    if command.max_batch < 1:
        raise SystemExit(f"error: max_batch must be >= 1, got {command.max_batch}")
    check_port(command.host, command.port)
    try:
        from minillm.generate import load_model

        model, tokenizer = load_model(command.model_path, command.device, command.dtype, command.compile)
    except Exception as e:
        raise SystemExit(f"error: {e}") from None
    name = command.model_name or Path(command.model_path).resolve().name
    if name in ("final", "checkpoints"):  # outputs/sft_tiny/final -> sft_tiny
        name = Path(command.model_path).resolve().parent.name
    app = create_app(model, tokenizer, name, command.max_batch, command.max_tokens)
    where = f"{model.lm_head.weight.device.type}, {str(model.lm_head.weight.dtype).removeprefix('torch.')}"
    url = f"http://{command.host}:{command.port}"
    print(f"serving {name} ({model.num_parameters():,} parameters, {where}): chat page {url}/, API {url}/v1")
    uvicorn.run(app, host=command.host, port=command.port, log_level="warning")


COMMAND = Command("serve", ServeCommand, run)
cli, main = COMMAND.cli, COMMAND.main


if __name__ == "__main__":
    cli()
