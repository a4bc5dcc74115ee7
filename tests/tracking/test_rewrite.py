"""relay.rewrite: the trackable links of a message and the per-recipient HTML rewrite."""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
import re
from dataclasses import dataclass, field
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from relay.rewrite import has_html, rewrite, trackable_links
from relay.tracking import TokenSigner

SECRET = b"test-secret-0123456789"
SIGNER = TokenSigner(SECRET)
BASE = "https://t.example.com"
RID = 42
CLICK_URL = re.compile(r"https://t\.example\.com/t/c/([A-Za-z0-9_-]+)")
HEADERS = (
    "From: App <app@example.com>\r\n"
    "To: jane@example.com\r\n"
    "Subject: A subject long enough that a generator would surely want to fold it somewhere around here, "
    "=?utf-8?q?caf=C3=A9?=\r\n"
    "X-Folded: one\r\n\ttwo\r\n"
    "MIME-Version: 1.0\r\n"
)


def track(raw: bytes, *, opens: bool = True, clicks: bool = True, rid: int = RID) -> bytes:
    return rewrite(raw, base_url=BASE, signer=SIGNER, recipient_id=rid, opens=opens, clicks=clicks)


def pixel(rid: int = RID) -> str:
    return f'<img src="{BASE}/t/o/{SIGNER.open_token(rid)}" width="1" height="1" alt="" style="display:none;border:0">'


def click(ordinal: int, rid: int = RID) -> str:
    return f'"{BASE}/t/c/{SIGNER.click_token(rid, ordinal)}"'


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def htmls(raw: bytes) -> list[str]:
    out = []
    for part in parse(raw).walk():
        if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment":
            assert isinstance(part, EmailMessage)
            content = part.get_content()
            assert isinstance(content, str)
            out.append(content)
    return out


def tree(raw: bytes) -> list[tuple[str, str | None, str | None]]:
    return [
        (p.get_content_type(), p.get("content-transfer-encoding"), p.get_content_charset()) for p in parse(raw).walk()
    ]


def clicked_ordinals(text: str, rid: int = RID) -> list[int]:
    out = []
    for token in CLICK_URL.findall(text):
        verified = SIGNER.verify(token)
        assert verified is not None
        assert verified.kind == "click"
        assert verified.recipient_id == rid
        out.append(verified.ordinal)
    return out


# --- building messages: every byte is known, and the html bodies are marked -------------------------------------


@dataclass
class Leaf:
    ctype: str
    content: bytes
    cte: str | None = None
    disposition: str | None = None
    expected: str | None = None  # the rewritten html, for the oracle
    urls: list[str] = field(default_factory=list)


@dataclass
class Multi:
    subtype: str
    boundary: str
    parts: list[Leaf | Multi]
    preamble: bytes = b""
    epilogue: bytes = b""


Node = Leaf | Multi
Segment = tuple[bytes, bool]  # (bytes, is a rewritable html body)


def encode_body(content: bytes, cte: str | None) -> bytes:
    if cte == "base64":
        return base64.encodebytes(content).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return quopri.encodestring(content)
    return content


def is_rewritable(leaf: Leaf) -> bool:
    return leaf.ctype.startswith("text/html") and leaf.disposition != "attachment"


def render(node: Node, headers: str = "") -> list[Segment]:
    if isinstance(node, Leaf):
        head = headers + f"Content-Type: {node.ctype}\r\n"
        if node.cte:
            head += f"Content-Transfer-Encoding: {node.cte}\r\n"
        if node.disposition:
            head += f"Content-Disposition: {node.disposition}\r\n"
        return [((head + "\r\n").encode(), False), (encode_body(node.content, node.cte), is_rewritable(node))]
    head = headers + f'Content-Type: multipart/{node.subtype};\r\n boundary="{node.boundary}"\r\n\r\n'
    segments: list[Segment] = [(head.encode() + node.preamble, False)]
    for part in node.parts:
        segments.append((f"\r\n--{node.boundary}\r\n".encode(), False))
        segments += render(part)
    segments.append((f"\r\n--{node.boundary}--\r\n".encode() + node.epilogue, False))
    return segments


def build(node: Node) -> tuple[bytes, list[Segment]]:
    segments = render(node, HEADERS)
    return b"".join(s for s, _ in segments), segments


def leaves(node: Node) -> list[Leaf]:
    return [node] if isinstance(node, Leaf) else [leaf for part in node.parts for leaf in leaves(part)]


def html_bodies_only_changed(segments: list[Segment], out: bytes) -> list[bytes]:
    """Asserts every byte outside the html bodies is unchanged; returns the new html bodies."""
    pattern = b"".join(b"(.*?)" if html else re.escape(data) for data, html in segments)
    m = re.fullmatch(pattern, out, re.DOTALL)
    assert m is not None, "bytes outside the html bodies changed"
    return list(m.groups())


def html(content: str, *, cte: str | None = None, charset: str | None = "utf-8") -> Leaf:
    ctype = "text/html" + (f'; charset="{charset}"' if charset else "")
    return Leaf(ctype, content.encode(charset or "ascii"), cte)


def plain(content: str = "Hello Jane,\r\nvisit http://example.com/plain\r\n") -> Leaf:
    return Leaf("text/plain; charset=utf-8", content.encode(), "7bit")


PDF = Leaf(
    'application/pdf; name="r.pdf"',
    b"%PDF-1.4\n" + bytes(range(256)) * 3,
    "base64",
    'attachment; filename="r.pdf"',
)
DOC = (
    '<html><head><title>Hi</title></head><body>\r\n<p>Reset: <a href="https://example.com/reset?t=1">here</a>'
    "</p>\r\n<p><a href='http://example.com/b'>b</a></p>\r\n</body></html>\r\n"
)
DOC_EXPECTED = (
    f"<html><head><title>Hi</title></head><body>\r\n<p>Reset: <a href={click(0)}>here</a>"
    f"</p>\r\n<p><a href={click(1)}>b</a></p>\r\n{pixel()}</body></html>\r\n"
)


# --- has_html, trackable_links -------------------------------------------------------------------------------------


def test_has_html() -> None:
    assert has_html(build(html(DOC))[0])
    assert has_html(b"Content-Type: TEXT/HTML\r\n\r\n<p>")
    assert not has_html(build(plain())[0])


LINK_CASES = [
    ('<a href="http://a.example/">', "http://a.example/"),
    ("<a href='https://a.example/x'>", "https://a.example/x"),
    ("<a href=https://a.example/u?x=1>", "https://a.example/u?x=1"),
    ('<A HREF="HTTPS://A.EXAMPLE/">', "HTTPS://A.EXAMPLE/"),
    ('<a\r\n  class="c"\r\n  href = "http://a.example/nl"\r\n>', "http://a.example/nl"),
    ('<a href="http://a.example/?a=1&amp;b=2&para=3">', "http://a.example/?a=1&b=2&para=3"),
    ('<a href="  http://a.example/ws  ">', "http://a.example/ws"),
    ('<a title="x > y" href="http://a.example/gt">', "http://a.example/gt"),
    ('<a href="http://a.example/first" href="http://a.example/second">', "http://a.example/first"),
    ('<a href="http://a.example/self"/>', "http://a.example/self"),
    ("<a target=_blank href=http://a.example/u2 class=x>", "http://a.example/u2"),
]
UNTRACKED = [
    '<a href="mailto:jane@example.com">',
    '<a href="tel:+15555550100">',
    '<a href="#top">',
    '<a href="/relative">',
    '<a href="relative/page">',
    '<a href="ftp://files.example.com/">',
    '<a href="javascript:void(0)">',
    "<a href>",
    "<a name=top>",
    '<a href="">',
    '<a data-relay-notrack href="http://n.example/">',
    '<a href="http://n.example/" data-relay-notrack="1">',
    '<a DATA-RELAY-NOTRACK=yes href="http://n.example/">',
    '<!-- <a href="http://c.example/"> -->',
    "<script>var a = '<a href=\"http://s.example/\">';</script>",
    '<STYLE>a[href="http://st.example/"] { } <a href="http://st.example/"></style>',
    '<img src="http://img.example/a.png">',
    '<link href="http://l.example/style.css">',
    '<abbr href="http://x.example/">',
    '<textarea><a href="http://t.example/"></textarea>',
    "<!DOCTYPE html>",
    "<![CDATA[ <a x ]]>",
    "</ a href='http://b.example/'>",
]


@pytest.mark.parametrize(("tag", "url"), LINK_CASES)
def test_trackable_link_forms(tag: str, url: str) -> None:
    raw, segments = build(html(f"<p>{tag}x</a></p>"))
    assert trackable_links(raw) == [url]
    (body,) = html_bodies_only_changed(segments, track(raw, opens=False))
    assert CLICK_URL.search(body.decode())
    assert clicked_ordinals(body.decode()) == [0]


@pytest.mark.parametrize("tag", UNTRACKED)
def test_untracked_links_are_left_alone(tag: str) -> None:
    doc = f'<p>{tag}x</a> <a href="http://after.example/">after</a></p>'
    raw = build(html(doc))[0]
    assert trackable_links(raw) == ["http://after.example/"]
    (out,) = htmls(track(raw, opens=False))
    assert out == doc.replace('"http://after.example/"', click(0))


def test_unterminated_comment_script_and_tag_hide_the_rest() -> None:
    for opener in ("<!-- ", "<script>", '<a title="', "<plaintext>", "<style>", "<!DOCTYPE"):
        raw = build(html(f'<a href="http://a.example/">a</a>{opener}<a href="http://b.example/">b</a>'))[0]
        assert trackable_links(raw) == ["http://a.example/"]


def test_comment_forms() -> None:
    doc = (
        '<!--><a href="http://1.example/"><!---><a href="http://2.example/">'
        '<!-- x --!><a href="http://3.example/"><!-- <a href="http://no.example/"> ---><a href="http://4.example/">'
    )
    assert trackable_links(build(html(doc))[0]) == [f"http://{i}.example/" for i in range(1, 5)]


# --- rewrite -------------------------------------------------------------------------------------------------------


def test_single_part_html() -> None:
    raw, segments = build(html(DOC))
    out = track(raw)
    (body,) = html_bodies_only_changed(segments, out)
    assert body.decode() == DOC_EXPECTED
    assert trackable_links(raw) == ["https://example.com/reset?t=1", "http://example.com/b"]
    assert clicked_ordinals(body.decode()) == [0, 1]
    assert out.endswith(b"</html>\r\n")


def test_opens_only_clicks_only_and_neither() -> None:
    raw = build(html(DOC))[0]
    (opens,) = htmls(track(raw, clicks=False))
    assert opens == DOC.replace("</body>", pixel() + "</body>")
    (clicks,) = htmls(track(raw, opens=False))
    assert clicks == DOC_EXPECTED.replace(pixel(), "")
    assert track(raw, opens=False, clicks=False) is raw


def test_pixel_goes_before_the_last_body_end_tag_or_at_the_end() -> None:
    doc = "<body><!-- </body> --><p>a</p></BODY>\r\n<p>late</p></body >\r\n"
    (out,) = htmls(track(build(html(doc))[0]))
    assert out == doc.replace("</body >", pixel() + "</body >")
    for doc in ("<p>no body</p>", "<p>no body</p>\r\n\r\n"):
        raw, segments = build(html(doc))
        (body,) = html_bodies_only_changed(segments, track(raw))
        assert body.decode() == doc.replace("</p>", "</p>" + pixel())


def test_output_ends_as_the_input_ended() -> None:
    for ending in ("", "\r\n", "\r\n\r\n"):
        raw = build(html("<p>x</p>" + ending))[0]
        assert track(raw).endswith(("</p>" + pixel() + ending).encode())


def test_multipart_alternative() -> None:
    message = Multi("alternative", "=_alt_1", [plain(), html(DOC, cte="quoted-printable")], b"preamble\r\n")
    raw, segments = build(message)
    out = track(raw)
    html_bodies_only_changed(segments, out)
    assert tree(out) == tree(raw)
    assert htmls(out) == [DOC_EXPECTED]
    text = next(p for p in parse(out).walk() if p.get_content_type() == "text/plain")
    assert isinstance(text, EmailMessage)
    assert text.get_content() == "Hello Jane,\r\nvisit http://example.com/plain\r\n"


def test_multipart_mixed_with_attachment() -> None:
    message = Multi("mixed", "b1", [html(DOC, cte="base64"), PDF])
    raw, segments = build(message)
    out = track(raw)
    (body,) = html_bodies_only_changed(segments, out)
    lines = body.split(b"\r\n")
    assert all(len(line) <= 76 for line in lines)
    assert all(len(line) == 76 for line in lines[:-2])
    assert body.endswith(b"\r\n")
    assert tree(out) == tree(raw)
    assert htmls(out) == [DOC_EXPECTED]
    pdf = [p for p in parse(out).walk() if p.get_content_type() == "application/pdf"]
    assert pdf[0].get_payload(decode=True) == PDF.content


def test_nested_multipart_counts_ordinals_across_parts() -> None:
    second = '<a href="http://second.example/">s</a><a href="mailto:x@example.com">m</a>'
    message = Multi(
        "mixed",
        "outer",
        [
            Multi(
                "alternative",
                "alt",
                [
                    plain(),
                    Multi("related", "rel", [html(DOC, cte="quoted-printable"), Leaf("image/png", b"PNG", "base64")]),
                ],
            ),
            html(second, cte="8bit"),
            Leaf("text/html", b'<a href="http://attached.example/">', "7bit", "attachment"),
            PDF,
        ],
        epilogue=b"epilogue\r\n",
    )
    raw, segments = build(message)
    out = track(raw)
    assert len(html_bodies_only_changed(segments, out)) == 2
    assert tree(out) == tree(raw)
    assert trackable_links(raw) == ["https://example.com/reset?t=1", "http://example.com/b", "http://second.example/"]
    first, second_html = htmls(out)
    assert first == DOC_EXPECTED
    assert clicked_ordinals(first) == [0, 1]
    assert clicked_ordinals(second_html) == [2]
    assert second_html == second.replace('"http://second.example/"', click(2)) + pixel()
    assert b"http://attached.example/" in out


@pytest.mark.parametrize("cte", [None, "8bit", "quoted-printable", "base64"])
def test_latin1_html(cte: str | None) -> None:
    doc = '<body><p>Caf\u00e9 cr\u00e8me, d\u00e9j\u00e0 vu</p><a href="http://ex.example/\u00e9">\u00e0</a></body>'
    leaf = html(doc, cte=cte, charset="iso-8859-1")
    if cte is None:
        leaf.ctype = "text/html; charset=iso-8859-1"
    raw, segments = build(leaf)
    out = track(raw)
    (body,) = html_bodies_only_changed(segments, out)
    assert htmls(out) == [doc.replace('"http://ex.example/\u00e9"', click(0)).replace("</body>", pixel() + "</body>")]
    assert trackable_links(raw) == ["http://ex.example/\u00e9"]
    if cte in (None, "8bit"):
        assert "cr\u00e8me".encode("latin-1") in raw
        assert "cr\u00e8me".encode("latin-1") in body


@pytest.mark.parametrize("cte", ["7bit", "8bit", "quoted-printable", "base64"])
def test_utf8_html(cte: str) -> None:
    doc = "<p>\u65e5\u672c\u8a9e \u20ac</p><a href=https://ex.example/\u20ac>x</a>\r\n" if cte != "7bit" else DOC
    raw = build(html(doc, cte=cte))[0]
    out = track(raw)
    (result,) = htmls(out)
    assert CLICK_URL.search(result)
    assert pixel() in result
    assert tree(out) == tree(raw)


def test_undecodable_bytes_round_trip() -> None:
    body = b'<p>\xff\xfe bad utf-8 \xc3\xa9</p><a href="http://x.example/">x</a>'
    raw = HEADERS.encode() + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + body
    out = track(raw, opens=False)
    head = raw[: -len(body)]
    assert out.startswith(head)
    assert out[len(head) :].replace(click(0).encode(), b'"http://x.example/"') == body


def test_unknown_charset_and_encoding_are_left_alone() -> None:
    for headers in (
        b"Content-Type: text/html; charset=x-unknown\r\n",
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n",
        b"Content-Type: text/html; charset=utf-16\r\n",
    ):
        raw = HEADERS.encode() + headers + b'\r\n<a href="http://x.example/">x</a></body>'
        assert track(raw) == raw
        assert trackable_links(raw) == []


def test_signed_messages_and_attached_messages_are_left_alone() -> None:
    inner = HEADERS.encode() + b'Content-Type: text/html\r\n\r\n<a href="http://x.example/">'
    signed = Multi(
        'signed; protocol="application/pkcs7-signature"',
        "s",
        [html(DOC), Leaf("application/pkcs7-signature", b"sig", "base64")],
    )
    raw = build(signed)[0]
    assert track(raw) == raw
    attached = build(Multi("mixed", "m", [plain(), Leaf("message/rfc822", inner)]))[0]
    assert track(attached) == attached


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no header section at all",
        b"Subject: x\r\n",
        b"Content-Type: text/html\r\n",
        b"Content-Type: multipart/mixed\r\n\r\n<a href=http://x.example/>",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>',
        b"Content-Type: text/html\n\n<a href=http://x.example/></body>\n",
    ],
)
def test_unparsable_messages_are_returned_unchanged(raw: bytes) -> None:
    assert track(raw) == raw


def test_missing_close_delimiter() -> None:
    raw = (
        HEADERS.encode() + b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n<a href=http://x.example/>x</a>\r\n"
    )
    out = track(raw)
    assert out.endswith(f"<a href={click(0)}>x</a>{pixel()}\r\n".encode())


def test_lines_stay_within_the_smtp_limit() -> None:
    doc = "<body>" + "x" * 900 + '<a href="http://a.example/">a</a>' * 3 + "</body>\r\n"
    raw, segments = build(html(doc, cte="7bit", charset="us-ascii"))
    (body,) = html_bodies_only_changed(segments, track(raw))
    assert max(map(len, body.split(b"\r\n"))) <= 998
    assert body.decode() == (
        "<body>" + "x" * 900 + "".join(f"<a href={click(i)}\r\n>a</a>" for i in range(3)) + f"\r\n{pixel()}</body>\r\n"
    )
    short = build(html('<a href="http://a.example/">a</a>' * 3, cte="7bit"))[0]
    assert b"\r\n>" not in track(short)


def test_lf_line_ends_inside_base64_are_kept() -> None:
    doc = '<html>\n<body>\n<a href="http://a.example/">a</a>\n</body>\n</html>\n'
    (out,) = htmls(track(build(html(doc, cte="base64"))[0]))
    assert out == doc.replace('"http://a.example/"', click(0)).replace("</body>", pixel() + "</body>")


def test_inline_html_is_rewritten_and_deep_nesting_is_left_alone() -> None:
    leaf = html(DOC)
    leaf.disposition = "inline"
    assert htmls(track(build(leaf)[0])) == [DOC_EXPECTED]
    node: Node = html(DOC)
    for depth in range(40):
        node = Multi("mixed", f"d{depth}", [node])
    raw = build(node)[0]
    assert track(raw) == raw
    assert trackable_links(raw) == []


def test_base_url_trailing_slash_is_ignored() -> None:
    raw = build(html('<a href="http://x.example/">'))[0]
    out = rewrite(raw, base_url=BASE + "/", signer=SIGNER, recipient_id=RID, opens=True, clicks=True)
    assert out == track(raw)


def test_recipients_get_their_own_tokens() -> None:
    raw = build(html(DOC))[0]
    (a,) = htmls(track(raw, rid=1))
    (b,) = htmls(track(raw, rid=2))
    assert clicked_ordinals(a, 1) == clicked_ordinals(b, 2) == [0, 1]
    assert pixel(1) in a
    assert pixel(2) in b


# --- properties ----------------------------------------------------------------------------------------------------


@dataclass
class Piece:
    before: str
    value: str = ""  # an href value, quotes included
    after: str = ""
    url: str | None = None  # set when trackable


TRACKED_SCHEMES = ["http://", "https://", "HTTP://", "hTTpS://"]
OTHER_SCHEMES = ["mailto:", "tel:+", "#", "/", "", "ftp://", "javascript:", "http:/", "data:"]
EXTRA_ATTRS = ['class="c"', "target=_blank", "title='a > b'", 'data-x=""', "id=x", 'style="color: red"']
NOTRACK = ["data-relay-notrack", 'data-relay-notrack=""', "DATA-RELAY-NOTRACK=1"]
SEPARATORS = st.sampled_from([" ", "\r\n  ", "\t", "  "])
WORDS = ["a", "xyz", "0123", ".,;:!?-()", "&", "&amp;", "[]", " ", "\r\n", "\t"]
TEXTS = {
    "us-ascii": WORDS,
    "iso-8859-1": [*WORDS, "caf\u00e9", "\u00e0\u00fc\u00df\u00a0"],
    "utf-8": [*WORDS, "caf\u00e9", "\u20ac", "\u65e5\u672c"],
}


@st.composite
def links(draw: st.DrawFn, charset: str) -> Piece:
    tracked = draw(st.integers(0, 3)) > 0
    scheme = draw(st.sampled_from(TRACKED_SCHEMES if tracked else OTHER_SCHEMES))
    host = draw(
        st.sampled_from(
            [
                "ex.com",
                "a.example.org/p",
                "x.example/a?b=1&amp;c=2",
                "y.example/?q=1&para=2",
                "z.example/?a&#38;b&#x26;c",
            ]
        )
    )
    if charset != "us-ascii":
        host += draw(st.sampled_from(["", "/caf\u00e9"]))
    pad = draw(st.sampled_from(["", " "]))
    quote = draw(st.sampled_from(['"', "'"] if pad else ['"', "'", ""]))
    value = f"{quote}{pad}{scheme}{host}{pad}{quote}"
    url = f"{scheme}{host}".replace("&amp;", "&").replace("&#38;", "&").replace("&#x26;", "&")
    notrack = [draw(st.sampled_from(NOTRACK))] if draw(st.integers(0, 4)) == 0 else []
    others = draw(st.lists(st.sampled_from(EXTRA_ATTRS), max_size=3)) + notrack
    at = draw(st.integers(0, len(others)))
    sep = draw(SEPARATORS)
    eq = draw(st.sampled_from(["=", " = ", "\r\n=\r\n"]))
    tag = draw(st.sampled_from(["a", "A"]))
    name = draw(st.sampled_from(["href", "HREF", "Href"]))
    before = f"<{tag}{sep}" + "".join(a + sep for a in others[:at]) + name + eq
    after = (
        "".join(sep + a for a in others[at:])
        + draw(st.sampled_from([">", " >", " />"] + (["/>"] if quote else [])))
        + f"label</{tag}>"
    )
    return Piece(before, value, after, url if tracked and not notrack else None)


@st.composite
def html_documents(draw: st.DrawFn, charset: str) -> list[Piece]:
    text = st.lists(st.sampled_from(TEXTS[charset]), max_size=8).map(lambda words: Piece("".join(words)))
    link = links(charset)

    def hidden(wrap: tuple[str, str]) -> st.SearchStrategy[Piece]:
        return link.map(lambda p: Piece(wrap[0] + p.before + p.value + p.after + wrap[1]))

    hiders = st.sampled_from(
        [
            ("<!-- ", " -->"),
            ("<!-- a > b ", " --!>"),
            ("<script>if (a > b) document.write('", "');</script>"),
            ("<script>document.write('", "');</script>"),
            ("<STYLE>/* ", " */</Style>"),
        ]
    )
    other = st.sampled_from(
        ["<p class='x'>", "</p>", "<br/>", '<img src="http://img.example/a.png">', "<a name=top>", "<!-- </body> -->"]
    ).map(Piece)
    pieces = draw(st.lists(st.one_of(text, link, link, hiders.flatmap(hidden), other), max_size=12))
    pieces.insert(draw(st.integers(0, len(pieces))), draw(link))
    if draw(st.booleans()):
        pieces.insert(0, Piece("<html><head><title>T</title></head><body>"))
        pieces.append(Piece(draw(st.sampled_from(["</body>", "</BODY>"]))))
        pieces.append(Piece(draw(st.sampled_from(["</html>", "</html>\r\n", ""]))))
    return pieces


@st.composite
def html_leaves(draw: st.DrawFn) -> tuple[Leaf, list[Piece]]:
    charset = draw(st.sampled_from(["us-ascii", "iso-8859-1", "utf-8"]))
    cte = draw(st.sampled_from([None, "7bit"] if charset == "us-ascii" else ["8bit", "quoted-printable", "base64"]))
    pieces = draw(html_documents(charset))
    doc = "".join(p.before + p.value + p.after for p in pieces)
    label = draw(
        st.sampled_from(
            [f"; charset={charset}", f'; CHARSET="{charset}"', ""]
            if charset == "us-ascii"
            else [f"; charset={charset}"]
        )
    )
    leaf = Leaf("text/html" + label, doc.encode(charset), cte)
    return leaf, pieces


@st.composite
def structures(draw: st.DrawFn, depth: int = 0) -> Node:
    if depth >= 2 or draw(st.integers(0, 2)) == 0:
        kind = draw(st.sampled_from(["html", "html", "html", "plain", "pdf", "html-attachment"]))
        if kind == "html":
            leaf, pieces = draw(html_leaves())
            leaf.expected = "\0".join(
                p.before + (p.value if p.url is None else "\1") + p.after for p in pieces
            )  # completed by number_links
            leaf.urls = [p.url for p in pieces if p.url is not None]
            return leaf
        if kind == "plain":
            return plain("".join(draw(st.lists(st.sampled_from([*TEXTS["utf-8"], "<a href=http://p/>"])))))
        if kind == "pdf":
            return PDF
        return Leaf("text/html", b'<a href="http://attached.example/">', "7bit", "attachment")
    boundary = f"=_b{depth}_" + draw(st.text(alphabet="abcXYZ019'()+_,-./:=?", min_size=1, max_size=20))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    parts = draw(st.lists(structures(depth + 1), min_size=1, max_size=3))
    preamble = draw(st.sampled_from([b"", b"This is a multi-part message in MIME format.\r\n"]))
    return Multi(subtype, boundary, parts, preamble, draw(st.sampled_from([b"", b"\r\n", b"end\r\n"])))


def expected_html(leaf: Leaf, first_ordinal: int) -> str:
    assert leaf.expected is not None
    chunks = leaf.expected.split("\0")
    ordinal = first_ordinal
    for i, chunk in enumerate(chunks):
        if "\1" in chunk:
            chunks[i] = chunk.replace("\1", click(ordinal))
            ordinal += 1
    doc = "".join(chunks)
    last = max(doc.rfind("</body>"), doc.rfind("</BODY>"))
    if last >= 0 and "<html>" in doc:
        return doc[:last] + pixel() + doc[last:]
    at = len(doc.rstrip("\r\n"))
    return doc[:at] + pixel() + doc[at:]


@given(structures())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rewrite_property(message: Node) -> None:
    raw, segments = build(message)
    out = track(raw)
    bodies = html_bodies_only_changed(segments, out)
    assert tree(out) == tree(raw)

    rewritable = [leaf for leaf in leaves(message) if is_rewritable(leaf)]
    for leaf, body in zip(rewritable, bodies, strict=True):
        lines = body.split(b"\r\n")
        assert not any(b"\r" in line or b"\n" in line for line in lines)
        assert max(map(len, lines)) <= (76 if leaf.cte in ("base64", "quoted-printable") else 998)
    expected_urls = [url for leaf in rewritable for url in leaf.urls]
    event(f"html parts: {min(len(rewritable), 3)}, links: {min(len(expected_urls), 5)}")
    event(f"multipart: {isinstance(message, Multi)}")
    assert trackable_links(raw) == expected_urls
    ordinal = 0
    expected = []
    for leaf in rewritable:
        expected.append(expected_html(leaf, ordinal))
        ordinal += len(leaf.urls)
    # Past 998 octets a plain part's rewrite breaks the line after a new attribute value.
    unbroken = [h.replace('"\r\n', '"') for h in htmls(out)]
    assert unbroken == [e.replace('"\r\n', '"') for e in expected]

    for before, after in zip(parse(raw).walk(), parse(out).walk(), strict=True):
        assert before.get_content_type() == after.get_content_type()
        rewritten = before.get_content_type() == "text/html" and before.get_content_disposition() != "attachment"
        if not before.is_multipart() and not rewritten:
            assert before.get_payload(decode=True) == after.get_payload(decode=True)


@given(structures(), st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rewrite_of_damaged_messages_never_raises(message: Node, data: st.DataObject) -> None:
    raw = build(message)[0]
    start = data.draw(st.integers(0, len(raw)))
    end = data.draw(st.integers(start, min(len(raw), start + 40)))
    damaged = raw[:start] + data.draw(st.binary(max_size=8)) + raw[end:]
    out = track(damaged)
    assert isinstance(trackable_links(damaged), list)
    if out != damaged:
        parse(out)


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_rewrite_of_arbitrary_bytes_never_raises(raw: bytes) -> None:
    out = track(b"Content-Type: text/html\r\n\r\n" + raw)
    assert isinstance(out, bytes)
    assert isinstance(trackable_links(raw), list)
    assert track(raw) == raw or has_html(raw)


# -- multipart splitting: bytes.find against RFC 2046's delimiter as a regular expression


def _split_by_regex(raw: bytes, boundary: bytes) -> list[tuple[int, int]] | str:
    """The oracle: the delimiter as a regular expression (how the splitter was first written)."""
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    for m in delimiter.finditer(raw):
        if part_start is not None:
            if m.start() < part_start:
                return "unparsable"
            ranges.append((part_start, m.start()))
        if m.group(1):
            return ranges
        part_start = m.end() + 2
    if part_start is not None and part_start <= len(raw):
        ranges.append((part_start, len(raw)))
    return ranges


_PIECES = st.sampled_from([b"--b", b"--b--", b"\r\n", b" ", b"\t", b"x", b"-", b"b", b"--bb", b"\r", b"\n"])


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=24).map(b"".join), st.sampled_from([0, 1, 3]))
@example(b"--b\r\nx\r\n--b--", 0)
@example(b"--b \r\nx\r\n--b--\t", 1)
@example(b"x\r\n--b\r\n\r\n--b\r\ny\r\n--b--\r\n", 3)
@example(b"--b\r\n--b\r\n--b--x\r\n--bb\r\n--b--", 0)
def test_multipart_split_matches_the_rfc_2046_delimiter(body: bytes, offset: int) -> None:
    from relay import rewrite as rw

    raw = b"h" * offset + body + b"tail"  # the body sits inside a larger message
    expected = _split_by_regex(body, b"b")
    try:
        got: list[tuple[int, int]] | str = [
            (a - offset, z - offset) for a, z in rw.split_multipart(raw, offset, offset + len(body), b"b")
        ]
    except rw.Unparsable:
        got = "unparsable"
    assert got == expected
