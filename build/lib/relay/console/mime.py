"""A stored message read for the console: its headers, its text and HTML parts and the list of
its attachments, with the stdlib email parser; and the HTML made inert for the sandboxed frame.

Stored mail is hostile input: broken charsets, malformed encoded words, multipart nested a
thousand deep, megabytes of headers. Nothing here raises for any of it: a part that cannot be
decoded is shown decoded with replacement characters, one that cannot be parsed is left out
with a note, and the raw source stays one download away (.eml).

``inert_html`` keeps the look of an HTML body and nothing that reaches out: no script, no
remote image, no link that can be followed (its target is kept as the title), no form, no
meta refresh, no base, no frames. The frame's CSP (default-src 'none') and ``sandbox`` stop
the same things again, so that viewing a body never records an open or a click.
"""

from __future__ import annotations

import email.parser
import email.policy
import html
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from html.parser import HTMLParser

MAX_HEADERS = 500  # header fields shown
MAX_HEADER_VALUE = 4000  # characters of one header shown
MAX_TEXT = 1_000_000  # characters of a text part shown
MAX_HTML = 2_000_000  # characters of an HTML part rendered
MAX_PARTS = 500  # MIME parts looked at
MAX_DEPTH = 30  # nesting of multiparts followed
_FOLD = re.compile(r"\r?\n[ \t]*")


@dataclass(slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int


@dataclass(slots=True)
class Parsed:
    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, in words


def _headers(msg: Message) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        items = msg.raw_items() if isinstance(msg, EmailMessage) else msg.items()
    except Exception:
        return out
    for name, raw in list(items)[:MAX_HEADERS]:
        value: str
        try:
            value = str(msg.policy.header_fetch_parse(name, raw)) if isinstance(raw, str) else str(raw)
        except Exception:
            value = str(raw)
        value = _FOLD.sub(" ", value).replace("\t", " ")  # unfolded: one line per field
        out.append((str(name)[:200], value[:MAX_HEADER_VALUE]))
    return out


def _payload_text(part: Message, limit: int) -> str:
    """A text part decoded: its charset when Python knows it, else UTF-8, never an error."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload[:limit] if isinstance(payload, str) else ""
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "utf-8"
        text = data.decode(charset, errors="replace")
    except (LookupError, ValueError, TypeError):
        text = data.decode("utf-8", errors="replace")
    return text[:limit]


def parse(raw: bytes) -> Parsed:
    """The parts of a stored message (the first text/plain and text/html found, outside attachments)."""
    out = Parsed()
    try:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    except (RecursionError, Exception):  # the parser should not raise; a hostile message found a way
        out.problems.append("This message could not be parsed; download the .eml to see its source.")
        return out
    out.headers = _headers(msg)
    # Walk by hand, with a bound on depth and parts: Message.walk() recurses without one.
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            out.problems.append(f"Only the first {MAX_PARTS} parts were looked at.")
            break
        try:
            if part.is_multipart():
                if depth >= MAX_DEPTH:
                    out.problems.append(f"Parts nested deeper than {MAX_DEPTH} levels are not shown.")
                    continue
                children = part.get_payload()
                if isinstance(children, list):
                    stack.extend((c, depth + 1) for c in reversed(children) if isinstance(c, Message))
                continue
            ctype = part.get_content_type()
            disposition = (part.get_content_disposition() or "").lower()
            filename = part.get_filename()
        except Exception:
            out.problems.append("A part could not be read and is not shown.")
            continue
        if disposition == "attachment" or filename or not ctype.startswith("text/"):
            try:
                data = part.get_payload(decode=True)
            except Exception:
                data = None
            size = len(data) if isinstance(data, bytes) else 0
            out.attachments.append(Attachment(str(filename or "(no name)")[:300], ctype, size))
            continue
        if ctype == "text/html" and out.html is None:
            out.html = _payload_text(part, MAX_HTML)
        elif ctype == "text/plain" and out.text is None:
            out.text = _payload_text(part, MAX_TEXT)
        elif ctype not in ("text/plain", "text/html"):
            out.attachments.append(Attachment("(inline)", ctype, len(_payload_text(part, MAX_TEXT))))
    return out


# -- HTML made inert

_DROP_WITH_CONTENT = frozenset({"script", "iframe", "frame", "frameset", "object", "embed", "applet", "noembed",
                                "template", "title", "noframes", "svg", "math"})  # fmt: skip
_DROP_TAG = frozenset({"base", "meta", "link", "form", "input", "button", "select", "textarea", "option",
                       "portal", "html", "head", "body", "param", "source", "track", "audio", "video",
                       "picture", "noscript"})  # fmt: skip
_VOID = frozenset(
    {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
)
# Attributes that load or navigate: never kept (a link's target becomes its title).
_URL_ATTRS = frozenset({"href", "src", "srcset", "action", "formaction", "background", "poster", "lowsrc",
                        "dynsrc", "ping", "cite", "longdesc", "usemap", "manifest", "codebase", "data",
                        "xlink:href", "imagesrcset", "profile", "classid", "archive"})  # fmt: skip
_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|jpg|webp);base64,[a-z0-9+/=\s]*$", re.IGNORECASE)
_CSS_URL = re.compile(r"url\s*\(|@import|expression\s*\(|image-set\s*\(|-moz-binding|behavior\s*:", re.IGNORECASE)
_TAG_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_ATTR_NAME = re.compile(r"^[a-z_:][a-z0-9_:.-]{0,60}$")


class _Inert(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0  # inside an element dropped with its content
        self.skip_tag = ""
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, close=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, close=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], *, close: bool) -> None:  # noqa: PLR0912 -- one rule a branch
        tag = tag.lower()
        if self.skip:
            if tag == self.skip_tag and not close and tag not in _VOID:
                self.skip += 1
            return
        if tag in _DROP_WITH_CONTENT:
            if not close and tag not in _VOID:
                self.skip, self.skip_tag = 1, tag
            return
        if tag in _DROP_TAG or not _TAG_NAME.match(tag):
            return
        kept: list[tuple[str, str]] = []
        for raw_name, raw_value in attrs:
            name, value = raw_name.lower(), raw_value or ""
            if not _ATTR_NAME.match(name) or name.startswith("on") or name in ("target", "formtarget", "is"):
                continue
            if name in _URL_ATTRS:
                if tag == "img" and name == "src" and _DATA_IMAGE.match(value.strip()):
                    kept.append((name, value.strip()))
                elif name in ("href", "xlink:href") and value.strip():
                    kept.append(("title", f"Link (not followed in the console): {value.strip()[:500]}"))
                    kept.append(("data-inert-link", ""))
                elif tag == "img" and name == "src" and value.strip():
                    kept.append(("title", f"Remote image not loaded: {value.strip()[:500]}"))
                continue
            if name == "style" and _CSS_URL.search(value):
                continue
            kept.append((name, value))
        rendered = "".join(f' {n}="{html.escape(v, quote=True)}"' if v != "" else f" {n}" for n, v in kept)
        self.out.append(f"<{tag}{rendered}{' /' if close else ''}>")
        if tag == "style" and not close:
            self.in_style = True

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if self.skip:
            if tag == self.skip_tag:
                self.skip -= 1
            return
        if tag in _DROP_TAG or tag in _DROP_WITH_CONTENT or tag in _VOID or not _TAG_NAME.match(tag):
            return
        if tag == "style":
            self.in_style = False
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.in_style:
            # CSS is kept (style-src 'unsafe-inline' in the frame) without anything that loads.
            self.out.append(_CSS_URL.sub("/* removed */(", data).replace("<", ""))
            return
        self.out.append(html.escape(data, quote=False))

    # Comments, doctypes, processing instructions, CDATA: dropped.
    def handle_comment(self, data: str) -> None:
        return

    def handle_decl(self, decl: str) -> None:
        return

    def handle_pi(self, data: str) -> None:
        return

    def unknown_decl(self, data: str) -> None:
        return


INERT_STYLE = "[data-inert-link]{color:#0b5cad;text-decoration:underline dotted;cursor:help}"


def inert_html(source: str) -> str:
    """``source`` with nothing that runs, loads or navigates (see the module docstring)."""
    parser = _Inert()
    try:
        parser.feed(source[:MAX_HTML])
        parser.close()
    except Exception:  # HTMLParser is lenient; this is for what it is not
        return "<p>This HTML part could not be shown. Download the .eml to see its source.</p>"
    body = "".join(parser.out)
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<style>{INERT_STYLE}</style></head><body>{body}</body></html>"
    )
