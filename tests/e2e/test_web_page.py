"""The web chat page of ``gptforge serve`` (``GET /``) in a real headless Chromium, driven by
Selenium: the page loads without the key, a message gets a streamed reply equal to the Python
API's, the stop button ends the generation on the server, "New chat" clears the conversation,
and a wrong API key shows the server's 401 in the page.

The server runs in a thread of the test process. Its model sleeps a little in every forward pass,
so that a reply streams for seconds and stopping it can be seen. Needs Debian's ``chromium`` and
``chromium-driver`` (.ci/run installs them); skipped where they are missing.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import threading
import time

import pytest

import gptforge
from gptforge.serve.server import ModelServer
from tests.tiny_checkpoints import make_base

KEY = "s3cret-key"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SECONDS_PER_FORWARD = 0.02

pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver")


class Forwards:
    """Counts (and slows down) the served model's forward passes."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1
        time.sleep(SECONDS_PER_FORWARD)


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("web"), block_size=1024)[0]


@pytest.fixture(scope="module")
def served(ckpt):
    generator = gptforge.load(ckpt, device="cpu")
    forwards = Forwards(generator.model)
    log = LogLines()
    logging.getLogger("gptforge.serve.server").addHandler(log)
    logging.getLogger("gptforge.serve.server").setLevel(logging.INFO)
    server = ModelServer(generator, port=0, model_name="tiny", api_key=KEY)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, forwards, log
    server.shutdown()
    server.close()
    logging.getLogger("gptforge.serve.server").removeHandler(log)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def el(driver, css: str):
    return driver.find_element("css selector", css)


def open_page(driver, server, key: str) -> None:
    driver.get(server.url + "/")
    field = el(driver, "#key")
    field.clear()
    field.send_keys(key)
    el(driver, "#system").click()  # leaving the field stores the key ("change")


def send(driver, text: str, max_tokens: int) -> None:
    field = el(driver, "#max_tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    el(driver, "#temperature").clear()
    el(driver, "#temperature").send_keys("0")
    el(driver, "#input").send_keys(text)
    el(driver, "#send").click()


def last_reply(driver) -> str:
    replies = driver.find_elements("css selector", ".msg.assistant .content")
    return replies[-1].text if replies else ""


def test_page_is_served_without_the_key_but_the_api_needs_it(served):
    server = served[0]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", "/")
    page = conn.getresponse()
    body = page.read().decode()
    assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")
    assert "/v1/chat/completions" in body and "http://" not in body.replace(
        "http://www.w3.org", "")  # nothing fetched from elsewhere
    conn.request("GET", "/v1/models")
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 401


@pytest.mark.slow
def test_chat_streams_stops_and_starts_over(served, browser, ckpt, tmp_path):
    server, forwards, log = served
    open_page(browser, server, KEY)
    wait_for(lambda: el(browser, "#model").text == "model: tiny", what="the model's name")

    send(browser, "hello", max_tokens=30)
    lengths = set()
    wait_for(lambda: lengths.add(len(last_reply(browser))) or
             browser.find_elements("css selector", ".msg.assistant.done"), what="the reply")
    reference = gptforge.load(ckpt, device="cpu").chat([{"role": "user", "content": "hello"}],
                                                       temperature=0, max_new_tokens=30)
    assert last_reply(browser) == reference
    assert len(lengths - {0, len(reference)}) >= 1  # it was seen part-way: it streamed

    send(browser, "how are you?", max_tokens=900)
    wait_for(lambda: len(last_reply(browser)) >= 5, what="the second reply to start")
    el(browser, "#stop").click()
    wait_for(lambda: "(stopped)" in el(browser, ".msg.assistant:last-child .note").text,
             what="the page to say it stopped")
    stopped_at, text = forwards.count, last_reply(browser)
    wait_for(lambda: any(" 499 " in line for line in log.lines), what="the server's 499")
    time.sleep(20 * SECONDS_PER_FORWARD)
    assert forwards.count <= stopped_at + 2  # the server stopped generating
    assert last_reply(browser) == text and len(text) < 900
    browser.save_screenshot(str(tmp_path / "chat.png"))

    el(browser, "#new-chat").click()
    assert browser.find_elements("css selector", ".msg") == []


@pytest.mark.slow
def test_a_wrong_key_shows_the_servers_401(served, browser):
    server = served[0]
    open_page(browser, server, "wrong-key")
    send(browser, "hello", max_tokens=5)
    error = wait_for(lambda: el(browser, "#error").text, what="the error")
    assert error.startswith("401") and "API key" in error
    assert last_reply(browser) == ""
