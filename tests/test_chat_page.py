"""The chat page of `minillm serve` (minillm/serve.html) in a real browser: headless Chromium driven by Selenium
against a live server on a random-weights model. Slow; `make test-slow` installs Debian's chromium and
chromium-driver on Linux."""

import asyncio
import json
import shutil
import urllib.request

import pytest
import torch

from minillm.model import MiniGPT
from tests.conftest import micro_config

pytestmark = pytest.mark.slow
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra installs selenium")
serve = pytest.importorskip("minillm.serve")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip(
        "no chromium/chromedriver on PATH: install Debian's chromium and chromium-driver (make test-slow does as root)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_serve import live_server  # noqa: E402

CONTEXT = 128


def recording(app, bodies: list, delay: dict):
    """The ASGI app, noting the JSON body of every chat completion request it receives; with delay["s"] > 0 every
    piece of a response is held back that long (a reply that streams slowly enough to be stopped)."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await app(scope, receive, send)
        chunks = []

        async def slow_send(message):
            if delay["s"] and message["type"] == "http.response.body" and message.get("body"):
                await asyncio.sleep(delay["s"])
            await send(message)

        async def receive_and_note():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    bodies.append(json.loads(b"".join(chunks)))
            return message

        return await app(scope, receive_and_note, slow_send)

    return wrapped


@pytest.fixture(scope="module")
def page(tokenizer):
    """(the page's url, the model, the request bodies the server received, the response delay to set)."""
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, block_size=CONTEXT)).eval()
    bodies: list = []
    delay = {"s": 0.0}
    app = recording(serve.create_app(model, tokenizer, "page-test", max_batch=4, default_max_tokens=16), bodies, delay)
    with live_server(app) as url:
        yield url, model, bodies, delay


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,750"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def the_same_request_unstreamed(url: str, body: dict) -> str:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body | {"stream": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def say(driver, text: str) -> str:
    """Send a message with Enter; wait for the reply to finish; its text as the page shows it."""
    done = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    set_field(driver, "input", text)
    driver.find_element(By.ID, "input").send_keys(Keys.ENTER)
    WebDriverWait(driver, 60).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) > done
            or d.find_element(By.ID, "error").is_displayed()
        )
    )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")


def test_the_chat_page_streams_replies_keeps_and_clears_the_history_and_shows_errors(page, browser, tmp_path):
    url, model, bodies, delay = page

    def page_requests() -> list[dict]:  # the streamed ones: the test's own checks ask unstreamed
        return [b for b in bodies if b["stream"]]

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "page-test")
    info = browser.find_element(By.ID, "model-info").text
    assert f"{model.num_parameters():,} parameters" in info and f"context {CONTEXT} tokens" in info

    set_field(browser, "system", "You are terse.")
    set_field(browser, "temperature", "0")  # greedy: the page's reply must equal the API's
    set_field(browser, "max_tokens", "12")
    browser.execute_script(  # count the reply's text updates: a streamed reply arrives in pieces
        "window.updates = 0; new MutationObserver((records) => { for (const r of records)"
        " if (r.target.classList && r.target.classList.contains('text')) window.updates++; })"
        ".observe(document.getElementById('messages'), {subtree: true, childList: true});"
    )
    first = say(browser, "Hello there")
    sent = page_requests()[-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 12
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    assert first and first == the_same_request_unstreamed(url, sent)
    assert browser.execute_script("return window.updates") >= 2

    second = say(browser, "And then?")  # the second turn carries the first, reply included
    assert page_requests()[-2]["messages"][1:] == [
        {"role": "user", "content": "Hello there"}
    ]  # the first request, untouched
    sent = page_requests()[-1]
    assert sent["messages"][1:] == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert second == the_same_request_unstreamed(url, sent)
    browser.save_screenshot(str(tmp_path / "chat_page.png"))
    assert (tmp_path / "chat_page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.find_element(By.ID, "clear").click()  # a new conversation: the server gets no earlier turn
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    say(browser, "Hi again")
    assert page_requests()[-1]["messages"][1:] == [{"role": "user", "content": "Hi again"}]

    long_message = "apple moon " * CONTEXT  # more tokens than the context: the server answers 400
    browser.find_element(By.ID, "input").send_keys(long_message, Keys.ENTER)
    error = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else None
    )
    assert f"this model's context is {CONTEXT} tokens" in error.text
    assert browser.find_element(By.ID, "input").get_attribute("value").strip() == long_message.strip()  # to edit
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1  # the refused turn was taken back
    say(browser, "Short one")  # and the conversation goes on without it
    assert [m["content"] for m in page_requests()[-1]["messages"] if m["role"] == "user"] == ["Hi again", "Short one"]

    # Stop: a reply that streams slowly is cut where it is, and the part shown stays in the conversation
    browser.find_element(By.ID, "clear").click()  # (a short conversation: the context is 128 tokens)
    delay["s"] = 0.15  # each piece of the reply held back
    set_field(browser, "max_tokens", "60")
    set_field(browser, "input", "Tell me more")
    browser.find_element(By.ID, "input").send_keys(Keys.ENTER)

    def last_reply(d) -> str:
        return d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")

    WebDriverWait(browser, 30).until(last_reply)  # the first piece is there
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-done")
    )
    delay["s"] = 0.0
    partial, stopped = last_reply(browser), page_requests()[-1]
    full = the_same_request_unstreamed(url, stopped)
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    say(browser, "Go on")
    assert page_requests()[-1]["messages"][-2:] == [
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Go on"},
    ]
