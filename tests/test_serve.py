"""minillm serve: the OpenAI-compatible server, end to end with the official `openai` client against a live
uvicorn server on a free port."""

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import torch

from minillm.generate import GenerationConfig, generate
from minillm.model import MiniGPT
from tests.conftest import micro_config

openai = pytest.importorskip("openai", reason="the test extra installs openai")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")
serve = pytest.importorskip("minillm.serve")

CHAT = [{"role": "user", "content": "Reverse the words: apple moon"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return MiniGPT(micro_config(tokenizer.vocab_size)).eval()


@contextlib.contextmanager
def live_server(app):
    """`app` served by uvicorn in a thread on a free port; yields its root url."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """(base url, app) of a live server on a free port."""
    app = serve.create_app(model, tokenizer, "micro", max_batch=8, default_max_tokens=16)
    with live_server(app) as url:
        yield f"{url}/v1", app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=n, **kw)


def test_chat_completion_plain_and_streamed_equal_generate(client, model, tokenizer):
    expected = generate(model, tokenizer, CHAT, greedy(12))
    reply = client.chat.completions.create(model="micro", messages=CHAT, temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length") and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(model="micro", messages=CHAT, temperature=0, max_tokens=12, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completions_models_stop_and_n(client, model, tokenizer):
    expected = generate(model, tokenizer, "In the beginning", greedy(10))
    reply = client.completions.create(model="micro", prompt="In the beginning", temperature=0, max_tokens=10)
    assert reply.choices[0].text == expected
    streamed = client.completions.create(
        model="micro", prompt="In the beginning", temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert [m.id for m in client.models.list().data] == ["micro"]

    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]  # a stop string the greedy reply contains
    assert stop.strip()
    cut = client.completions.create(model="micro", prompt="In the beginning", temperature=0, max_tokens=10, stop=stop)
    assert cut.choices[0].text == generate(model, tokenizer, "In the beginning", greedy(10, stop=[stop]))
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text

    sampled = client.chat.completions.create(model="micro", messages=CHAT, n=3, seed=7, max_tokens=8)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    again = client.chat.completions.create(model="micro", messages=CHAT, n=3, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]  # seeded


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"extra_body": {"bogus": 1}}, "unknown field(s) 'bogus'"),
        ({"frequency_penalty": 0.5}, "'frequency_penalty' is not supported by this server (only 0)"),
        ({"temperature": 5}, "'temperature' must be in [0.0, 2.0], got 5"),
        ({"max_tokens": 0}, "'max_tokens' must be in [1, None], got 0"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "this model's context is 64 tokens"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] needs a role"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_problem_and_the_server_goes_on(client, kwargs, message):
    args = {"model": "micro", "messages": CHAT, "max_tokens": 4} | kwargs
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**args)
    assert error.value.status_code == 400 and message in error.value.message
    assert client.chat.completions.create(model="micro", messages=CHAT, max_tokens=4).choices[0].message  # serving


def test_concurrent_clients_each_get_their_own_reply(client, model, tokenizer):
    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)]
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="micro", messages=prompts[i], temperature=0, max_tokens=16)
        replies[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [replies[i] for i in range(8)] == [generate(model, tokenizer, p, greedy(16)) for p in prompts]


def test_seeded_samples_and_usage_do_not_depend_on_concurrent_requests(client, model, tokenizer):
    args = {"model": "micro", "messages": CHAT, "seed": 11, "max_tokens": 12, "temperature": 0.9}
    alone = client.chat.completions.create(**args).choices[0].message.content
    replies = [None] * 4
    threads = [
        threading.Thread(target=lambda i=i: replies.__setitem__(i, client.chat.completions.create(**args)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.choices[0].message.content for r in replies] == [alone] * 4

    neutral = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}  # what some clients always send
    chunks = list(
        client.chat.completions.create(**args, **neutral, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_waiting_requests_with_equal_settings_decode_as_one_batch(model, tokenizer):
    batcher = serve.Batcher(model, tokenizer, max_batch=6, start=False)
    loop = asyncio.new_event_loop()
    jobs = [serve.Job(f"Prompt {i}", 3, greedy(6), 1, loop) for i in range(4)]
    jobs.append(serve.Job("Two samples", 2, GenerationConfig(max_new_tokens=6, seed=1), 2, loop))  # other settings
    jobs.append(serve.Job("Too many", 2, greedy(6), 3, loop))  # 4 + 3 rows > max_batch: the next batch
    jobs.append(serve.Job("Same seed", 2, GenerationConfig(max_new_tokens=6, seed=1), 1, loop))  # seeded: alone
    jobs.append(serve.Job("Long", 60, greedy(6), 1, loop))  # 60 + 6 > 64: would cut the others' replies short
    jobs.append(serve.Job("Short", 3, greedy(6), 1, loop))
    for job in jobs:
        batcher.submit(job)
    assert batcher.next_batch() == jobs[:4] + [jobs[8]]  # the long prompt waits, the short one joins
    assert batcher.next_batch() == [jobs[4]]
    assert batcher.next_batch() == [jobs[5]]  # 60 + 6 > 64 again
    assert batcher.next_batch() == [jobs[6]]
    assert batcher.next_batch() == [jobs[7]]
    loop.close()


def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"error: port {port} on 127.0.0.1 is in use"):
            serve.check_port("127.0.0.1", port)
