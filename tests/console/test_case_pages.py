"""The case pages, the audit page and the users page over real HTTP (a running Relay, httpx):
roles, CSRF, unknown and closed cases, hostile form values, the exports."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import httpx
import pytest
from helpers import queue_id_of, send, smtp_client
from helpers.console import PASSWORD, Console, console_with, csrf_of, sign_in

from relay.console.cases_pages import csv_cell

CASE_URL = re.compile(r"^/ui/cases/(\d+)")
MSG = b"From: app@example.com\r\nTo: jane@example.com\r\nSubject: Your invoice\r\n\r\nInvoice 42.\r\n"


async def submit(console: Console, rcpts: list[str], data: bytes = MSG) -> str:
    async with smtp_client(console.relay) as client:
        code, text = await send(client, "app@example.com", rcpts, data)
    assert code == 250, text
    return queue_id_of(text)


async def open_case(
    client: httpx.AsyncClient, queue_ids: list[str], title: str = "Jane's invoice", **extra: str
) -> int:
    csrf = await csrf_of(client, "/ui/cases")
    extra.setdefault("incident", "The customer says it never arrived")
    data: dict[str, str | list[str]] = {"csrf": csrf, "queue_id": queue_ids, "title": title, **extra}
    r = await client.post("/ui/cases/new", data=data)
    assert r.status_code == 303, r.text
    match = CASE_URL.match(r.headers["location"])
    assert match, r.headers["location"]
    return int(match.group(1))


async def post(client: httpx.AsyncClient, url: str, page: str, **data: str) -> httpx.Response:
    """A form posted as the page would, with the session's CSRF token."""
    return await client.post(url, data={"csrf": await csrf_of(client, page), **data})


async def trail(console: Console, case_id: int) -> list[str]:
    case = await console.store.case(case_id, sla=3600)
    assert case is not None
    return [e.kind for e in case.entries]


async def test_a_case_from_opening_to_feedback(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    async with console.signed_in("sam") as sam:
        # the search page's selection posts ids without a title: the form to complete comes back
        r = await sam.post("/ui/cases/new", data={"csrf": await csrf_of(sam), "queue_id": [qid], "from": "search"})
        assert r.status_code == 200
        assert f'value="{qid}" checked' in r.text
        assert 'name="owner" value="sam"' in r.text  # the owner defaults to whoever opens it
        case_id = await open_case(sam, [qid.lower()], customer_ref="T-1")
        page = await sam.get(f"/ui/cases/{case_id}")
        assert page.status_code == 200
        assert "Jane&#39;s invoice" in page.text
        assert 'data-state="open"' in page.text
        assert f'href="/ui/messages/{qid}"' in page.text
        assert "jane@example.com" in page.text  # its recipient with the live state
        assert 'data-kind="incident"' in page.text
        url = f"/ui/cases/{case_id}/entries"
        for data in ({"kind": "interaction", "channel": "phone", "summary": "Jane called"},
                     {"kind": "escalation", "to": "postmaster", "why": "mailbox full?"},
                     {"kind": "resolution", "summary": "Jane cleaned her mailbox"},
                     {"kind": "confirmation", "how": "Jane replied to the ticket"}):  # fmt: skip
            r = await post(sam, url, f"/ui/cases/{case_id}", **data)
            assert r.status_code == 303, r.text
            assert r.headers["location"] == f"/ui/cases/{case_id}#trail"
        case = await console.store.case(case_id, sla=3600)
        assert case is not None
        assert case.state == "confirmed"
        assert case.owner == "sam"
        assert case.customer_ref == "T-1"
        # a confirmed case takes feedback, nothing else
        r = await post(sam, url, f"/ui/cases/{case_id}", kind="feedback", score="5", comment="quick")
        assert r.status_code == 303
        r = await post(sam, url, f"/ui/cases/{case_id}", kind="interaction", channel="email", summary="late")
        assert r.status_code == 409
        r = await post(sam, f"/ui/cases/{case_id}/actions", f"/ui/cases/{case_id}", action="retry", queue_id=qid)
        assert r.status_code == 409
        page = (await sam.get(f"/ui/cases/{case_id}")).text
        assert "score 5/5: quick" in page
        assert 'id="form-interaction"' not in page  # closed: only the feedback form is left
        assert 'id="form-feedback"' in page
    assert await trail(console, case_id) == [
        "incident", "interaction", "escalation", "resolution", "confirmation", "feedback"
    ]  # fmt: skip


async def test_actions_from_a_case_run_with_its_id(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    other = await submit(console, ["bob@example.com"])
    async with console.signed_in("sam") as sam:
        case_id = await open_case(sam, [qid])
        page = f"/ui/cases/{case_id}"
        r = await post(sam, f"{page}/actions", page, action="retry", queue_id=qid, reason="mailbox fixed")
        assert r.status_code == 303, r.text
        r = await post(sam, f"{page}/actions", page, action="resend", target=f"{qid} jane@example.com",
                       new_address="jane.doe@example.com")  # fmt: skip
        assert r.status_code == 303, r.text
        # a message the case does not cover, an unknown action, a recipient the message lacks
        r = await post(sam, f"{page}/actions", page, action="retry", queue_id=other)
        assert r.status_code == 422
        r = await post(sam, f"{page}/actions", page, action="explode", queue_id=qid)
        assert r.status_code == 422
        r = await post(sam, f"{page}/actions", page, action="resend", target=f"{qid} nobody@example.com",
                       new_address="x@example.com")  # fmt: skip
        assert r.status_code == 422
        text = (await sam.get(page)).text
    case = await console.store.case(case_id, sla=3600)
    assert case is not None
    assert case.state == "action_taken"
    actions = [e.details for e in case.entries if e.kind == "action"]
    assert [a["action"] for a in actions] == ["retry", "resend"]
    new_qid = actions[1]["new_queue_id"]
    assert new_qid in text  # the resent message shows with its live state
    view = await console.store.get_message(qid)
    assert view is not None
    retried = [e for e in view.events if e.type == "retried"]
    assert retried
    assert retried[0].details["case_id"] == case_id
    assert retried[0].details["by"] == "sam"


async def test_viewer_reads_but_cannot_post(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    async with console.signed_in("sam") as sam:
        case_id = await open_case(sam, [qid])
    async with console.signed_in("vera") as vera:
        page = await vera.get(f"/ui/cases/{case_id}")
        assert page.status_code == 200
        assert 'method="post" action="/ui/cases/' not in page.text  # no forms, no buttons
        assert "Retry now" not in page.text
        assert (await vera.get("/ui/cases")).status_code == 200
        assert (await vera.get(f"/ui/cases/{case_id}/export.json")).status_code == 200
        csrf = await csrf_of(vera, "/ui/cases")  # the viewer's own, valid token
        for url, data in ((f"/ui/cases/{case_id}/entries", {"kind": "interaction", "channel": "phone", "summary": "x"}),
                          (f"/ui/cases/{case_id}/actions", {"action": "retry", "queue_id": qid}),
                          ("/ui/cases/new", {"title": "mine", "queue_id": qid}),
                          ("/ui/users/add", {"name": "eve", "role": "admin", "password": "p" * 12})):  # fmt: skip
            r = await vera.post(url, data={"csrf": csrf, **data})
            assert r.status_code == 403, url
        assert (await vera.get("/ui/cases/new")).status_code == 403
        assert (await vera.get("/ui/audit")).status_code == 403
        assert (await vera.get("/ui/users")).status_code == 403
    async with console.signed_in("sam") as sam:
        assert (await sam.get("/ui/audit")).status_code == 403  # admin only
        assert (await sam.get("/ui/users")).status_code == 403
    assert await trail(console, case_id) == ["incident"]
    assert await console.store.user_role("eve") is None


async def test_posts_without_the_sessions_csrf_token_are_refused(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    async with console.signed_in("sam") as sam, console.signed_in("ada") as ada:
        case_id = await open_case(sam, [qid])
        others = await csrf_of(ada)  # a valid token, of another session
        url = f"/ui/cases/{case_id}/entries"
        form = {"kind": "interaction", "channel": "phone", "summary": "forged"}
        for token in (None, "", "x" * 43, others, (await csrf_of(sam)) + "x"):
            data = form if token is None else {**form, "csrf": token}
            r = await sam.post(url, data=data)
            assert r.status_code == 403, token
            assert "did not come from this console" in r.text
        r = await sam.post("/ui/cases/new", data={"title": "no token", "queue_id": qid})
        assert r.status_code == 403
        r = await ada.post("/ui/users/add", data={"name": "eve", "role": "admin", "password": "p" * 12,
                                                 "csrf": await csrf_of(sam)})  # fmt: skip
        assert r.status_code == 403
    assert await trail(console, case_id) == ["incident"]
    cases, _ = await console.store.cases(sla=3600)
    assert len(cases) == 1
    assert await console.store.user_role("eve") is None


async def test_unknown_cases_answer_the_404_page(console: Console) -> None:
    async with console.signed_in("sam") as sam:
        csrf = await csrf_of(sam)
        for case_id in ("999999", "abc", "1e3", "-1", "9" * 40, "%00"):
            for suffix in ("", "/export.json", "/export.csv", "/print"):
                r = await sam.get(f"/ui/cases/{case_id}{suffix}")
                assert r.status_code == 404, (case_id, suffix)
                assert "text/html" in r.headers["content-type"]
                assert "There is no case" in r.text or "no such page" in r.text.lower()
            r = await sam.post(f"/ui/cases/{case_id}/entries",
                               data={"csrf": csrf, "kind": "resolution", "summary": "x"})  # fmt: skip
            assert r.status_code == 404


async def test_hostile_form_values_are_refused_with_a_sentence(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    async with console.signed_in("sam") as sam:
        csrf = await csrf_of(sam)
        for title in ("", "nul\x00title", "t" * 10_000):
            r = await sam.post("/ui/cases/new", data={"csrf": csrf, "queue_id": qid, "title": title})
            assert r.status_code == 422, title[:20]
            assert "flash-error" in r.text
        r = await sam.post("/ui/cases/new", data={"csrf": csrf, "queue_id": "NOSUCHMESSAGE", "title": "x"})
        assert r.status_code == 422
        case_id = await open_case(sam, [qid])
        page = f"/ui/cases/{case_id}"
        for data in ({"kind": "interaction", "channel": "pigeon", "summary": "x"},
                     {"kind": "interaction", "channel": "phone", "summary": "a\x00b"},
                     {"kind": "interaction", "channel": "phone", "summary": "s" * 100_000},
                     {"kind": "feedback", "score": "6"}, {"kind": "feedback", "score": "1e0"},
                     {"kind": "action", "action": "retry"}, {"kind": "incident", "summary": "again"},
                     {"kind": "close", "reason": ""}, {"kind": ""}):  # fmt: skip
            r = await post(sam, f"{page}/entries", page, **data)
            assert r.status_code == 422, data
            assert "flash-error" in r.text
    assert await trail(console, case_id) == ["incident"]
    cases, _ = await console.store.cases(sla=3600)
    assert len(cases) == 1


async def test_exports_json_csv_and_print(console: Console) -> None:
    qid = await submit(console, ["jane@example.com"])
    async with console.signed_in("sam") as sam:
        case_id = await open_case(sam, [qid], customer_ref='=HYPERLINK("http://evil")', incident="@SUM(A1:A9)")
        page = f"/ui/cases/{case_id}"
        for summary in ("Jane called", "plain text, with a comma"):
            r = await post(sam, f"{page}/entries", page, kind="interaction", channel="phone", summary=summary)
            assert r.status_code == 303
        r = await post(sam, f"{page}/entries", page, kind="resolution", summary="=1+1")
        assert r.status_code == 303
        r = await sam.get(f"{page}/export.json")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["content-disposition"] == f'attachment; filename="case-{case_id}.json"'
        doc = json.loads(r.text)
        r = await sam.get(f"{page}/export.csv")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"] == f'attachment; filename="case-{case_id}.csv"'
        rows = list(csv.reader(io.StringIO(r.text)))
        printed = await sam.get(f"{page}/print")
    assert set(doc) == {"case", "entries", "exported_by", "exported_at"}
    assert doc["case"]["id"] == case_id
    assert doc["case"]["state"] == "resolved"
    assert doc["case"]["customer_ref"] == '=HYPERLINK("http://evil")'  # JSON keeps the value as it is
    assert doc["case"]["queue_ids"] == [qid]
    assert doc["exported_by"] == "sam"
    assert [e["kind"] for e in doc["entries"]] == ["incident", "interaction", "interaction", "resolution"]
    for e in doc["entries"]:
        assert set(e) == {"id", "at", "actor", "kind", "summary", "details", "hash"}
        assert re.fullmatch(r"[0-9a-f]{64}", e["hash"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["at"])
        assert e["actor"] == "sam"
    assert doc["entries"][0]["details"] == {"summary": "@SUM(A1:A9)"}
    assert doc["entries"][1]["summary"] == "phone: Jane called"
    assert rows[0] == ["at", "actor", "kind", "summary", "hash"]
    assert [r[1:4] for r in rows[1:]] == [
        ["sam", "incident", "'@SUM(A1:A9)"], ["sam", "interaction", "phone: Jane called"],
        ["sam", "interaction", "phone: plain text, with a comma"], ["sam", "resolution", "'=1+1"],
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == [e["at"] for e in doc["entries"]]
    assert [r[4] for r in rows[1:]] == [e["hash"] for e in doc["entries"]]
    assert printed.status_code == 200
    assert "<nav" not in printed.text
    assert "case-print.css" in printed.text
    assert doc["entries"][-1]["hash"] in printed.text
    lines, _ = await console.store.audit_entries(action="case.export")
    assert sorted(line.details["format"] for line in lines) == ["csv", "json", "print"]
    assert {line.target for line in lines} == {f"case:{case_id}"}


async def test_csv_export_neutralises_every_formula_start(console: Console) -> None:
    async with console.signed_in("sam") as sam:
        for value in ("=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)"):
            case_id = await open_case(sam, [], incident=value)
            rows = list(csv.reader(io.StringIO((await sam.get(f"/ui/cases/{case_id}/export.csv")).text)))
            assert rows[1][3] == "'" + value
            assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


def test_csv_cells_that_look_like_formulas_are_quoted() -> None:
    for value in ("=1+1", "+1", "-1", "@A1", "\t=1", "\r=1"):
        assert csv_cell(value) == "'" + value
    for value in ("", "plain", "1-1", "a=b", "'already"):
        assert csv_cell(value) == value


async def test_the_case_list_filters_and_marks_overdue(tmp_path: Path) -> None:
    async with console_with(tmp_path, console={"case_sla": "1ms"}) as console:
        qid = await submit(console, ["jane@example.com"])
        async with console.signed_in("sam") as sam, console.signed_in("ada") as ada:
            mine = await open_case(sam, [qid], title="Sam's case")
            hers = await open_case(ada, [qid], title="Ada's case")
            closed = await open_case(sam, [], title="Closed one")
            r = await post(sam, f"/ui/cases/{hers}/entries", f"/ui/cases/{hers}", kind="escalation", to="ops", why="x")
            assert r.status_code == 303
            r = await post(sam, f"/ui/cases/{closed}/entries", f"/ui/cases/{closed}", kind="close", reason="spam")
            assert r.status_code == 303

            async def listed(query: str) -> list[int]:
                r = await sam.get("/ui/cases" + query)
                assert r.status_code == 200
                return [int(n) for n in re.findall(r'data-case-id="(\d+)"', r.text)]

            assert await listed("") == [closed, hers, mine]  # newest first
            assert await listed("?owner=ada") == [hers]
            assert await listed("?escalated=1") == [hers]
            assert await listed("?state=closed_unresolved") == [closed]
            assert await listed("?state=open") == [mine]
            assert await listed("?overdue=1") == [hers, mine]  # open past the SLA; the closed one is not
            assert await listed("?state=nonsense&before=abc") == [closed, hers, mine]
            text = (await sam.get("/ui/cases")).text
            assert text.count('class="badge overdue"') == 2
            assert 'id="case-overdue"' in (await sam.get(f"/ui/cases/{mine}")).text


async def test_users_page_adds_and_removes_console_users(console: Console) -> None:
    async with console.signed_in("ada") as ada:
        page = await ada.get("/ui/users")
        assert page.status_code == 200
        for name in ("vera", "sam", "ada", "smitty"):
            assert f'data-user="{name}"' in page.text
        assert "cannot sign in" in page.text  # smitty, the SMTP user
        add = {"name": "nina", "role": "support", "password": "a long password"}
        r = await post(ada, "/ui/users/add", "/ui/users", **add)
        assert r.status_code == 303
        assert await console.store.user_role("nina") == "support"
        r = await post(ada, "/ui/users/add", "/ui/users", **add)
        assert r.status_code == 409
        for bad in ({"role": "smtp"}, {"role": "root"}, {"name": "bad name"}, {"name": "x" * 200},
                    {"password": "short"}, {"password": "nul\x00nul\x00nul"}):  # fmt: skip
            r = await post(ada, "/ui/users/add", "/ui/users", **{**add, "name": "other", **bad})
            assert r.status_code == 422, bad
        assert await console.store.user_role("other") is None
        nina = console.client()
        assert (await sign_in(nina, "nina", "a long password")).status_code == 303
        assert (await nina.get("/ui/cases")).status_code == 200
        r = await post(ada, "/ui/users/remove", "/ui/users", name="ada")
        assert r.status_code == 422  # not yourself
        r = await post(ada, "/ui/users/remove", "/ui/users", name="nobody")
        assert r.status_code == 404
        r = await post(ada, "/ui/users/remove", "/ui/users", name="nina")
        assert r.status_code == 303
        assert await console.store.user_role("nina") is None
        r = await nina.get("/ui/cases")
        assert r.status_code == 303  # signed out with the user
        await nina.aclose()
    lines, _ = await console.store.audit_entries(actor="ada")
    done = [(line.action, line.target, dict(line.details)) for line in lines if line.action.startswith("user.")]
    assert done == [("user.remove", "nina", {"role": "support"}), ("user.add", "nina", {"role": "support"})]


async def test_the_audit_page_lists_filters_and_verifies(console: Console) -> None:
    async with console.signed_in("sam"):
        pass
    bad = console.client()
    assert (await sign_in(bad, "sam", "wrong password")).status_code == 401
    await bad.aclose()
    async with console.signed_in("ada") as ada:
        r = await ada.get("/ui/audit")
        assert r.status_code == 200
        assert "signin_failed" in r.text
        r = await ada.get("/ui/audit", params={"actor": "sam"})
        rows = re.findall(r"<code>([a-z_.]+)</code>", r.text)
        assert "signin" in rows
        assert "signin_failed" in rows
        assert all(f">{name}<" not in r.text for name in ("ada", "vera"))
        r = await ada.get("/ui/audit", params={"action": "signin_failed"})
        assert re.findall(r"<code>([a-z_.]+)</code>", r.text) == ["signin_failed"]
        r = await ada.get("/ui/audit", params={"verify": "1"})
        assert 'data-ok="true"' in r.text
        assert "The chains are intact" in r.text
        for junk in ({"before": "x" * 50}, {"before": "-1"}, {"actor": "\x00" * 10}, {"action": "a" * 5000}):
            assert (await ada.get("/ui/audit", params=junk)).status_code in (200, 400), junk
        # no way to change it: no POST route under /ui/audit
        r = await ada.post("/ui/audit", data={"csrf": await csrf_of(ada)})
        assert r.status_code == 405


@pytest.mark.parametrize("role_user", ["vera", "sam"])
async def test_the_nav_shows_admin_pages_to_admins_only(console: Console, role_user: str) -> None:
    async with console.signed_in(role_user) as client:
        text = (await client.get("/ui/cases")).text
        assert 'href="/ui/cases"' in text
        assert 'href="/ui/users"' not in text
    async with console.signed_in("ada") as ada:
        assert 'href="/ui/users"' in (await ada.get("/ui/cases")).text
    assert PASSWORD


@pytest.mark.postgres
async def test_hostile_values_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """NUL and control characters in filters, forms and ids: refused or ignored, never a 500
    (PostgreSQL refuses NUL in text where SQLite would store it)."""
    async with console_with(tmp_path, store={"url": postgres_url}) as console:
        qid = await submit(console, ["jane@example.com"])
        async with console.signed_in("ada") as ada:
            case_id = await open_case(ada, [qid])
            page = f"/ui/cases/{case_id}"
            for query in ({"owner": "a\x00b"}, {"state": "\x00"}, {"before": "\x00"}, {"owner": "\x01" * 300}):
                assert (await ada.get("/ui/cases", params=query)).status_code == 200, query
            for query in ({"actor": "\x00"}, {"action": "x\x00y"}, {"before": "1\x00"}, {"actor": "\x7f" * 5000}):
                assert (await ada.get("/ui/audit", params=query)).status_code == 200, query
            for data in ({"kind": "interaction", "channel": "phone", "summary": "a\x00b"},
                         {"kind": "escalation", "to": "x\x00", "why": "y"}, {"kind": "close", "reason": "\x00"},
                         {"kind": "feedback", "score": "5", "comment": "\x00"}):  # fmt: skip
                r = await post(ada, f"{page}/entries", page, **data)
                assert r.status_code == 422, data
            for data in ({"action": "retry", "queue_id": f"{qid}\x00"},
                         {"action": "resend", "target": f"{qid} jane@example.com", "new_address": "a\x00@example.com"},
                         {"action": "unsuppress", "target": f"{qid} jane\x00@example.com", "reason": "x"}):  # fmt: skip
                r = await post(ada, f"{page}/actions", page, **data)
                assert r.status_code == 422, data
            csrf = await csrf_of(ada)
            r = await ada.post("/ui/cases/new", data={"csrf": csrf, "queue_id": qid, "title": "t\x00", "owner": "o"})
            assert r.status_code == 422
            r = await ada.post("/ui/users/remove", data={"csrf": csrf, "name": "sam\x00"})
            assert r.status_code == 404
            r = await ada.post("/ui/users/add", data={"csrf": csrf, "name": "eve", "role": "viewer",
                                                      "password": "pass\x00word"})  # fmt: skip
            assert r.status_code == 422
        assert await trail(console, case_id) == ["incident"]
