"""The console in a real browser: headless Chromium driven by Selenium, against `relay serve`
delivering for real to an SMTP sink on loopback (reached by a static route), the journeys of
issue 12 in order (a..i), sharing one relay and one browser. Each page is saved as a screenshot
under test-artifacts/console/."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import smtplib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from helpers import ServeProcess, serve_config
from helpers.peers import Sink, SinkBehaviour

from relay.auth import hash_password
from relay.logstore import LogStore

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
TOKEN = "browser-test-api-token-0123456789"
PASSWORDS = {"sam": "support-password-1", "val": "viewer-password-1", "ada": "admin-password-1"}
JANE = "jane@example.com"
REFUSED = "550 5.1.1 <jane@example.com>: Recipient address rejected: User unknown"
WAIT = 20.0  # seconds a page may take to show what a step waits for

pytestmark = pytest.mark.timeout(240)


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI never skips them silently
        pytest.skip(reason)


# -- what the journeys run against


class Background:
    """An event loop in a thread: the sink and the relay process live there, the (blocking)
    browser in the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="browser-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class PixelServer:
    """A tiny HTTP server that records every request: the remote image of the HTML test message
    points here, so a hit means the console let the message fetch it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                body = bytes.fromhex(
                    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
                )
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    base: str  # the console's origin, http://127.0.0.1:PORT
    smtp_port: int
    driver: Any  # selenium.webdriver.Chrome
    sink: Sink
    pixel: PixelServer
    found: dict[str, Any] = field(default_factory=dict)  # what the journeys did: see ``journey``
    user: str = ""  # who is signed in in the browser

    def journey(self, name: str, run: Callable[[World], T]) -> T:
        """``run``'s result, running it first if this world has not yet. pytest-xdist may hand a
        later journey to another worker than the earlier ones (each worker has its own relay and
        browser): a journey then walks the ones it builds on itself."""
        if name not in self.found:
            self.found[name] = run(self)
        value: T = self.found[name]
        return value

    def as_user(self, name: str) -> None:
        if self.user != name:
            sign_in(self, name)

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    def browser_client(self) -> httpx.Client:
        """An HTTP client holding the browser's cookies (the session cookie is HttpOnly: the
        page's JavaScript cannot read it, WebDriver can)."""
        jar = httpx.Cookies()
        for c in self.driver.get_cookies():
            jar.set(c["name"], c["value"], domain="127.0.0.1", path=c.get("path", "/"))
        return httpx.Client(base_url=self.base, cookies=jar, timeout=10, follow_redirects=False)


async def _add_users(url: str) -> None:
    """The console users, in the store `relay serve` opens next (as `relay users add` does)."""
    store = await LogStore.open(url)
    try:
        await store.upgrade()
        for name, role in (("sam", "support"), ("val", "viewer"), ("ada", "admin")):
            await store.add_user(name, await asyncio.to_thread(hash_password, PASSWORDS[name]), role)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_factory.mktemp("console-browser")
    with contextlib.ExitStack() as stack:  # whatever started is stopped, also when a later start fails
        bg = Background()
        stack.callback(bg.stop)
        pixel = PixelServer()
        stack.callback(pixel.close)
        sink = bg.run(Sink("127.0.0.1", behaviour=SinkBehaviour(rcpt={JANE: REFUSED})).start())
        stack.callback(lambda: bg.run(sink.close()))
        # hard_bounces off: the journeys' retry is meant to reach the fixed sink, not the suppression list
        config = serve_config(tmp, f"""
[delivery]
retry_schedule = ["1h"]
connect_timeout = "2s"
[http]
listen = "127.0.0.1:0"
api_tokens = ["{TOKEN}"]
[suppression]
hard_bounces = false
[[routes]]
domains = ["*"]
host = "127.0.0.1"
port = {sink.port}
""")  # fmt: skip
        (tmp / "data").mkdir()
        bg.run(_add_users(f"sqlite+aiosqlite:///{tmp / 'data' / 'relay.db'}"))
        server = ServeProcess(config)
        stack.callback(lambda: _stop(bg, server))
        bg.run(server.start())
        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                    "--disable-gpu", "--no-first-run", "--disable-extensions"):  # fmt: skip
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        stack.callback(driver.quit)
        driver.set_page_load_timeout(WAIT)
        # the screenshots' size: a 1280x900 viewport, whatever the headless window's decorations take
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        yield World(f"http://127.0.0.1:{server.ports['http']}", server.smtp_port, driver, sink, pixel)


def _stop(bg: Background, server: ServeProcess) -> None:
    if server.proc is not None and server.proc.returncode is None:
        server.terminate()
        bg.run(server.wait())


# -- small steps


def shot(world: World, name: str, at: str | None = None) -> None:
    """The viewport as test-artifacts/console/NAME.png; scrolled to the element ``at`` first."""
    if at is not None:
        world.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", css(world, at))
    world.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(world: World, condition: Callable[[Any], Any], timeout: float = WAIT) -> Any:
    """WebDriverWait for ``condition``; on a timeout the page is saved (TIMEOUT.png, TIMEOUT.html)
    and the failure names its URL."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(world.driver, timeout).until(condition)
    except TimeoutException:
        world.driver.save_screenshot(str(ARTIFACTS / "TIMEOUT.png"))
        (ARTIFACTS / "TIMEOUT.html").write_text(world.driver.page_source)
        raise AssertionError(f"waited {timeout}s in vain on {world.driver.current_url}") from None


def css(world: World, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return world.driver.find_element(By.CSS_SELECTOR, selector)


def all_css(world: World, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(world.driver.find_elements(By.CSS_SELECTOR, selector))


def page_ready(world: World) -> None:
    wait(world, lambda d: d.execute_script("return document.readyState") == "complete")


def open_page(world: World, path: str) -> None:
    world.driver.get(world.base + path)
    page_ready(world)


def sign_in(world: World, name: str) -> None:
    """Signs out whoever was signed in (cookies dropped) and signs ``name`` in."""
    world.driver.delete_all_cookies()
    open_page(world, "/ui/login")
    css(world, "input[name=username]").send_keys(name)
    css(world, "input[name=password]").send_keys(PASSWORDS[name])
    css(world, "form[action='/ui/login'] button[type=submit]").click()
    wait(world, lambda d: "/ui/login" not in d.current_url)
    page_ready(world)
    world.user = name


def submit(world: World, rcpt: str, data: bytes) -> str:
    """One message over SMTP; its queue id."""
    with smtplib.SMTP("127.0.0.1", world.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("app@example.com")
        code, _ = client.rcpt(rcpt)
        assert code == 250
        code, reply = client.data(data)
        assert code == 250, reply
    return reply.decode().rsplit("queued as ", 1)[1].strip()


def message_state(world: World, qid: str) -> dict[str, str]:
    with world.api() as api:
        r = api.get(f"/api/v1/messages/{qid}")
        r.raise_for_status()
        return {x["address"]: x["status"] for x in r.json()["recipients"]}


def poll(world: World, check: Callable[[], T | None], timeout: float = WAIT, what: str = "condition") -> T:
    """Polls ``check`` (which may reload a page) until it is truthy, with WebDriverWait's deadline."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        value: T = WebDriverWait(world.driver, timeout, poll_frequency=0.2).until(lambda _: check())
    except TimeoutException:
        raise AssertionError(f"{what}: not within {timeout}s") from None
    return value


# -- the journeys, in order; each a function of the world, each a test


def sign_in_journey(world: World) -> None:
    world.driver.delete_all_cookies()
    world.user = ""
    open_page(world, "/ui/")
    wait(world, lambda d: "/ui/login" in d.current_url)  # not signed in: sent to sign in
    shot(world, "a_signin")
    sign_in(world, "sam")
    assert "sam" in world.driver.page_source
    shot(world, "a_signed_in")


def search_journey(world: World) -> str:
    """The bounced message's queue id."""
    world.journey("a", sign_in_journey)
    world.as_user("sam")
    qid = submit(world, JANE, b"From: app@example.com\r\nTo: jane@example.com\r\nSubject: Your invoice\r\n\r\n"
                 b"Invoice 42 is attached.\r\n")  # fmt: skip
    poll(world, lambda: message_state(world, qid).get(JANE) == "bounced", what="the bounce")
    open_page(world, "/ui/messages")
    box = css(world, "form.searchbar input[name=q]")
    box.send_keys(f"to:{JANE} status:bounced")
    box.submit()
    wait(world, lambda d: "status%3Abounced" in d.current_url and qid in d.page_source)
    assert "1 message" in css(world, "p.count").text
    shot(world, "b_search")
    assert css(world, f"a[href='/ui/messages/{qid}']").is_displayed()
    return qid


def timeline_journey(world: World) -> str:
    """The bounced message, its page open."""
    qid = world.journey("b", search_journey)
    world.as_user("sam")
    open_page(world, "/ui/messages?" + str(httpx.QueryParams({"q": f"to:{JANE} status:bounced"})))
    css(world, f"a[href='/ui/messages/{qid}']").click()  # from the search results
    wait(world, lambda d: d.current_url.endswith(f"/ui/messages/{qid}"))
    page_ready(world)
    timeline = css(world, "#tl-h").find_element("xpath", "..").text
    assert "Bounced" in timeline
    assert "5.1.1" in timeline  # the sink's reply, as the timeline shows it
    assert "User unknown" in timeline
    shot(world, "c_message")
    shot(world, "c_message_timeline", at="#tl-h")
    return qid


def open_case_journey(world: World) -> int:
    """The case opened from the message page."""
    qid = world.journey("c", timeline_journey)
    world.as_user("sam")
    open_page(world, f"/ui/messages/{qid}")
    css(world, "form[action='/ui/cases/new'] button[type=submit]").click()  # "Open a case for this message"
    wait(world, lambda d: all_css(world, "form.case-new input[name=title]"))
    css(world, "form.case-new input[name=title]").send_keys("Invoice to Jane bounced")
    css(world, "form.case-new input[name=customer_ref]").send_keys("TICKET-4711")
    shot(world, "d_case_new")
    css(world, "form.case-new button[type=submit]").click()
    wait(world, lambda d: re.search(r"/ui/cases/\d+$", d.current_url))
    page_ready(world)
    match = re.search(r"/ui/cases/(\d+)$", world.driver.current_url)
    assert match
    assert css(world, "#case-state").get_attribute("data-state") == "open"
    assert qid in css(world, "#messages").text
    incident = css(world, ".trail .entry[data-kind=incident]").text
    assert f"{qid} to {JANE}: bounced" in incident  # summarised by Relay from the bounce
    assert "5.1.1" in incident
    shot(world, "d_case")
    return int(match.group(1))


def confirmed_journey(world: World) -> int:
    """The case, confirmed by Relay once the retried recipient was delivered."""
    case_id, qid = world.journey("d", open_case_journey), world.journey("b", search_journey)
    world.as_user("sam")
    world.sink.behaviour.rcpt.pop(JANE, None)  # the mailbox exists again
    open_page(world, f"/ui/cases/{case_id}")
    css(world, f"tr[data-queue-id='{qid}'] button.action-retry").click()
    wait(world, lambda d: all_css(world, ".trail .entry[data-kind=action]"))
    shot(world, "e_case_retried")

    def confirmed() -> bool:
        open_page(world, f"/ui/cases/{case_id}")
        return css(world, "#case-state").get_attribute("data-state") == "confirmed"

    poll(world, confirmed, timeout=45, what="the case confirmed on its own")
    assert message_state(world, qid)[JANE] == "delivered"
    assert JANE in world.sink.rcpts
    confirmation = css(world, ".trail .entry[data-kind=confirmation]")
    assert confirmation.find_element("css selector", ".actor").text == "relay"  # not by hand
    assert "confirmed automatically" in confirmation.text
    shot(world, "e_case_confirmed")
    return case_id


def test_a_sign_in(world: World) -> None:
    world.journey("a", sign_in_journey)


def test_b_search_finds_the_bounce(world: World) -> None:
    world.journey("b", search_journey)


def test_c_message_timeline(world: World) -> None:
    world.journey("c", timeline_journey)


def test_d_open_a_case(world: World) -> None:
    world.journey("d", open_case_journey)


def test_e_fix_retry_and_confirmed_by_itself(world: World) -> None:
    world.journey("e", confirmed_journey)


def test_f_export_the_resolution_log(world: World) -> None:
    case_id = world.journey("e", confirmed_journey)
    world.as_user("sam")
    with world.browser_client() as client:
        r = client.get(f"/ui/cases/{case_id}/export.json")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["content-disposition"] == f'attachment; filename="case-{case_id}.json"'
        doc = r.json()
        r = client.get(f"/ui/cases/{case_id}/export.csv")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
    assert doc["case"]["id"] == case_id
    assert doc["case"]["state"] == "confirmed"
    assert doc["case"]["customer_ref"] == "TICKET-4711"
    assert [e["kind"] for e in doc["entries"]] == ["incident", "action", "confirmation"]
    assert doc["entries"][1]["details"]["action"] == "retry"
    assert doc["entries"][2]["details"]["automatic"] is True
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["hash"]) for e in doc["entries"])
    assert rows[0] == ["at", "actor", "kind", "summary", "hash"]
    assert [r[1:3] for r in rows[1:]] == [["sam", "incident"], ["sam", "action"], ["relay", "confirmation"]]
    assert [r[4] for r in rows[1:]] == [e["hash"] for e in doc["entries"]]
    open_page(world, f"/ui/cases/{case_id}")
    css(world, "#export-print").click()
    wait(world, lambda d: d.current_url.endswith(f"/ui/cases/{case_id}/print"))
    page_ready(world)
    assert not all_css(world, "nav")  # printable: no navigation
    assert "TICKET-4711" in world.driver.page_source
    assert doc["entries"][-1]["hash"] in world.driver.page_source
    shot(world, "f_print")


def test_g_viewer_sees_no_body_and_no_actions(world: World) -> None:
    qid, case_id = world.journey("b", search_journey), world.journey("d", open_case_journey)
    world.as_user("val")
    open_page(world, f"/ui/messages/{qid}")
    assert "Invoice 42 is attached" not in world.driver.page_source  # no body
    assert not all_css(world, "iframe")
    assert not all_css(world, "main form[method=post]")  # no action buttons (the header's sign-out is a form)
    assert not all_css(world, "main button")
    shot(world, "g_viewer_message")
    open_page(world, f"/ui/cases/{case_id}")
    assert not all_css(world, "main form[method=post]")
    assert not all_css(world, "button.action-retry")
    shot(world, "g_viewer_case")
    with world.browser_client() as client:  # and the server refuses what the page does not offer
        r = client.post(f"/ui/cases/{case_id}/entries", data={"kind": "interaction", "channel": "phone",
                                                               "summary": "viewer was here"})  # fmt: skip
        assert r.status_code == 403
        r = client.get(f"/ui/messages/{qid}/html")
        assert r.status_code == 403


def test_h_post_without_csrf_refused(world: World) -> None:
    world.as_user("sam")
    qid = submit(world, "bob@example.net", b"Subject: Order shipped\r\n\r\nOn its way.\r\n")
    open_page(world, f"/ui/cases/new?queue_id={qid}")
    css(world, "form.case-new input[name=title]").send_keys("Bob asks about his order")
    css(world, "form.case-new button[type=submit]").click()
    wait(world, lambda d: d.current_url.split("#")[0].rstrip("/").split("/")[-1].isdigit())
    case_id = int(world.driver.current_url.split("/ui/cases/")[1].split("#")[0])
    page_ready(world)
    before = len(all_css(world, ".trail .entry"))
    # the browser: the form's hidden token removed, then sent
    world.driver.execute_script("document.querySelector('#form-interaction input[name=csrf]').remove()")
    css(world, "#form-interaction textarea[name=summary]").send_keys("called the customer")
    css(world, "#form-interaction button[type=submit]").click()
    wait(world, lambda d: d.title.startswith("403"))  # the refusal page
    assert "did not come from this console" in world.driver.page_source
    shot(world, "h_csrf_refused")
    # and a forged request with the session cookie but a wrong token
    with world.browser_client() as client:
        forged = {"kind": "interaction", "channel": "phone", "summary": "forged", "csrf": "x" * 43}
        r = client.post(f"/ui/cases/{case_id}/entries", data=forged)
        assert r.status_code == 403
        r = client.post(f"/ui/cases/{case_id}/entries", data={"kind": "interaction", "channel": "phone",
                                                               "summary": "forged"})  # fmt: skip
        assert r.status_code == 403
    open_page(world, f"/ui/cases/{case_id}")
    assert len(all_css(world, ".trail .entry")) == before  # nothing changed
    assert "called the customer" not in world.driver.page_source


def test_i_html_body_script_and_pixel_inert(world: World) -> None:
    pixel = f"http://127.0.0.1:{world.pixel.port}/pixel.gif"
    html = (
        "<html><head><title>Mail</title></head><body>"
        '<p id="marker">untouched</p>'
        "<script>document.getElementById('marker').textContent = 'script ran'; window.ranScript = 1;"
        " try { parent.document.title = 'hijacked'; } catch (e) {}</script>"
        f'<img id="pixel" src="{pixel}" width="1" height="1" alt="">'
        '<p><a href="https://example.org/offer">offer</a></p>'
        "</body></html>"
    )
    data = (
        "From: App <app@example.com>\r\nTo: kim@example.net\r\nSubject: HTML with a script\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain part\r\n"
        f"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b1--\r\n"
    ).encode()
    qid = submit(world, "kim@example.net", data)
    world.as_user("sam")
    open_page(world, f"/ui/messages/{qid}")
    title = world.driver.title
    frame = wait(world, lambda d: all_css(world, "iframe") and css(world, "iframe"))
    sandbox = frame.get_attribute("sandbox")
    assert sandbox is not None  # sandboxed...
    assert "allow-scripts" not in sandbox  # ...without scripts
    world.driver.switch_to.frame(frame)
    try:
        wait(world, lambda d: all_css(world, "#marker"))
        page_ready(world)
        assert css(world, "#marker").text == "untouched"  # the script did not run
    finally:
        world.driver.switch_to.default_content()
    assert world.driver.title == title != "hijacked"
    shot(world, "i_html_message", at="#body-h")
    assert world.pixel.hits == []  # the remote image was never fetched


def test_j_admin_reads_the_audit_and_adds_a_user(world: World) -> None:
    world.journey("d", open_case_journey)  # a case to list, whichever worker runs this test
    world.as_user("ada")
    open_page(world, "/ui/cases")
    assert all_css(world, "tr[data-case-id]")
    shot(world, "j_cases")
    open_page(world, "/ui/audit")
    assert "signin" in css(world, "table.audit").text
    css(world, "#verify-chains").click()
    wait(world, lambda d: all_css(world, "#chain-report"))
    assert css(world, "#chain-report").get_attribute("data-ok") == "true"
    shot(world, "j_audit")
    open_page(world, "/ui/users")
    form = css(world, "#form-user-add")
    form.find_element("css selector", "input[name=name]").send_keys("nina")
    form.find_element("css selector", "input[name=password]").send_keys("nina-password-1")
    form.find_element("css selector", "button[type=submit]").click()
    wait(world, lambda d: all_css(world, "tr[data-user=nina]"))
    assert "support" in css(world, "tr[data-user=nina]").text
    shot(world, "j_users")
    open_page(world, "/ui/audit?" + str(httpx.QueryParams({"action": "user.add"})))
    assert "nina" in css(world, "table.audit").text


def test_k_dashboard_and_held_pages(world: World) -> None:
    """The remaining pages, each saved: the dashboard (figures, the per-tag chart) and the held list."""
    world.journey("e", confirmed_journey)
    world.as_user("sam")
    open_page(world, "/ui/dashboard")
    assert all_css(world, "div.figures")
    assert all_css(world, "svg.chart")  # mail went out under a tag: the chart has something to show
    shot(world, "k_dashboard")
    open_page(world, "/ui/held")
    assert css(world, "h1").text == "Held messages"
    shot(world, "k_held")


def test_z_screenshots_for_the_readme(world: World) -> None:
    """Every journey saved its pages; the README's three come from these."""
    world.journey("e", confirmed_journey)
    for name in ("b_search", "c_message", "e_case_confirmed"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000
    if os.environ.get("CONSOLE_DOCS_SCREENSHOTS"):  # refresh docs/ by hand: CONSOLE_DOCS_SCREENSHOTS=1 pytest ...
        docs = ARTIFACTS.parents[1] / "docs"
        for src, dst in (("b_search", "console-search"), ("c_message", "console-message"),
                         ("e_case_confirmed", "console-case")):  # fmt: skip
            shutil.copyfile(ARTIFACTS / f"{src}.png", docs / f"{dst}.png")
