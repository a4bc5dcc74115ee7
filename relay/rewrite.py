"""The per-recipient rewrite of a tracked message's HTML, and the link scanner it shares with intake.

``trackable_links`` (at intake) and ``rewrite`` (at delivery) read links with one scanner, a
subset of the HTML5 tokenizer, so the ordinals that intake stores are the ones that delivery
signs. The MIME splicing replaces only the bodies of the text/html parts, leaving every other
byte of the message as it was; a message it cannot parse goes out unchanged.

Pure functions on bytes, no I/O. Callers reach them through ``relay.tracking`` (``Tracker``
at delivery, ``has_html`` and ``trackable_links`` at intake).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html.entities
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import compat32
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.tracking import TokenSigner  # the type only: relay.tracking imports this module

log = logging.getLogger(__name__)

# --- HTML scanning -------------------------------------------------------------------------------------------------
# A subset of the HTML5 tokenizer: enough to find real <a> start tags and </body> end tags, skipping comments,
# bogus comments, doctypes and raw-text elements. Atomic groups keep the tag grammar deterministic, as the
# tokenizer is: a tag that does not reach its ">" runs to the end of the document.

_WS = r"\t\n\f\r "
_VALUE = rf"""(?:"[^"]*"|'[^']*'|[^{_WS}>"'][^{_WS}>]*+)"""
_TAG = re.compile(
    rf"<(/?)([A-Za-z][^{_WS}/>]*+)"
    rf"((?>[{_WS}/]++|[^{_WS}/>][^{_WS}/>=]*+(?:[{_WS}]*+=[{_WS}]*+(?:{_VALUE}|(?=>))|(?![{_WS}]*=)))*+)>"
)
_ATTR = re.compile(rf"([^{_WS}/>][^{_WS}/>=]*+)(?:[{_WS}]*+=[{_WS}]*+({_VALUE})?)?")
_RAW_TEXT = frozenset({"script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes"})
_COMMENT_END = re.compile(r"--!?>")
_CHARREF = re.compile(r"&(#[xX][0-9a-fA-F]+;?|#[0-9]+;?|[A-Za-z0-9]+;?)")
_TRACKABLE = re.compile(r"https?://", re.IGNORECASE)
# Only a "<" followed by one of these can start markup; the others are skipped in C, not one by one.
_MARKUP = re.compile(r"<[A-Za-z!?/]")
_LONGEST_ENTITY = max(map(len, html.entities.html5))
_URL_STRIP = "".join(map(chr, range(0x21)))


@dataclass(frozen=True, slots=True)
class _Link:
    start: int  # span of the href value, quotes included
    end: int
    url: str


@dataclass(frozen=True, slots=True)
class _Scan:
    links: list[_Link]
    body_close: int | None  # where the last </body> starts


def _scan(text: str) -> _Scan:
    links: list[_Link] = []
    body_close: int | None = None
    pos = 0
    while pos >= 0 and (candidate := _MARKUP.search(text, pos)) is not None:
        lt = candidate.start()
        nxt = text[lt + 1 : lt + 2]
        if text.startswith("<!--", lt):
            pos = _comment_end(text, lt + 4)
        elif _tag_start(nxt) or (nxt == "/" and _tag_start(text[lt + 2 : lt + 3])):
            m = _TAG.match(text, lt)
            if m is None:
                break  # end of file inside a tag
            name = m.group(2).lower()
            if not m.group(1):
                pos = _after_start_tag(text, m, name, links)
                continue
            if name == "body":
                body_close = lt
            pos = m.end()
        elif nxt in ("!", "?", "/"):
            pos = text.find(">", lt + 2) + 1 or -1  # bogus comment, doctype, CDATA, "</>"
        else:
            pos = lt + 1
    return _Scan(links, body_close)


def _comment_end(text: str, pos: int) -> int:
    """Where the comment whose "<!--" ends at pos ends; -1 when it runs to the end."""
    if text.startswith(">", pos) or text.startswith("->", pos):
        return text.find(">", pos) + 1
    end = _COMMENT_END.search(text, pos)
    return -1 if end is None else end.end()


def _after_start_tag(text: str, m: re.Match[str], name: str, links: list[_Link]) -> int:
    if name == "a":
        link = _link(text, m.start(3), m.group(3))
        if link is not None:
            links.append(link)
    elif name == "plaintext":
        return -1
    elif name in _RAW_TEXT:
        close = re.compile(rf"</{name}[{_WS}/>]", re.IGNORECASE).search(text, m.end())
        return -1 if close is None else close.start()
    return m.end()


def _link(text: str, offset: int, attrs: str) -> _Link | None:
    href: tuple[int, int, str] | None = None
    seen: set[str] = set()
    for m in _ATTR.finditer(attrs):
        name = m.group(1).lower()
        if name == "data-relay-notrack":
            return None
        if name in seen:
            continue  # the first of duplicate attributes wins
        seen.add(name)
        if name == "href" and m.group(2) is not None:
            href = (offset + m.start(2), offset + m.end(2), m.group(2))
    if href is None:
        return None
    start, end, value = href
    if value[:1] in ("'", '"'):
        value = value[1:-1]
    url = _unescape_attribute(value).strip(_URL_STRIP).replace("\t", "").replace("\n", "").replace("\r", "")
    if not _TRACKABLE.match(url) or not url.isprintable():  # also rules out lone surrogates
        return None
    return _Link(start, end, url)


def _tag_start(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _unescape_attribute(value: str) -> str:
    """html.unescape with the attribute rule: a named reference lacking ";" before "=" or an alnum stays as is."""
    if "&" not in value:
        return value

    def replace(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref[0] == "#":
            return html.unescape(m.group(0))
        if ref.endswith(";") and ref in html.entities.html5:
            return html.entities.html5[ref]
        name = ref.rstrip(";")
        for size in range(min(len(name), _LONGEST_ENTITY), 1, -1):  # bounded: linear in the value
            if name[:size] in html.entities.html5:  # legacy references, valid without ";"
                following = (ref[size:] + m.string[m.end() : m.end() + 1])[:1]
                if following == "=" or following.isalnum():
                    return m.group(0)
                return html.entities.html5[name[:size]] + ref[size:]
        return m.group(0)

    return _CHARREF.sub(replace, value)


# --- MIME ----------------------------------------------------------------------------------------------------------

_MAX_DEPTH = 32
_OPAQUE_MULTIPART = frozenset({"multipart/signed", "multipart/encrypted"})  # rewriting would break them
_PLAIN_CTES = frozenset({"7bit", "8bit", "binary"})
_MAX_LINE = 998  # octets, RFC 5321
_EXACT_CODECS = frozenset({"utf-8", "ascii"})  # strict decoding round-trips: no need to encode again to check
_Edit = tuple[int, int, str, str]  # start, end, replacement, replacement with a line break


class Unparsable(Exception):
    """A MIME structure the rewrite will not touch (too deep, or delimiters that overlap)."""


@dataclass(frozen=True, slots=True)
class _HtmlPart:
    start: int  # the part's body in the whole message
    end: int
    cte: str
    codec: str
    errors: str
    text: str
    scan: _Scan


# The parts of the last few small messages: intake finds the links, delivery rewrites them for
# each recipient, and without this each of them parsed the same HTML again. Small messages only,
# so that the cache stays small (64 x 16 KB, with their decoded text).
_PARTS_CACHE: OrderedDict[bytes, tuple[_HtmlPart, ...]] = OrderedDict()
_PARTS_CACHE_ENTRIES = 64
_PARTS_CACHE_MAX_MESSAGE = 16 * 1024


_PARTS_CACHE_LOCK = threading.Lock()  # intake and delivery call this from worker threads


def _html_parts(raw: bytes) -> tuple[_HtmlPart, ...]:
    small = len(raw) <= _PARTS_CACHE_MAX_MESSAGE
    if small:
        with _PARTS_CACHE_LOCK:
            hit = _PARTS_CACHE.get(raw)
            if hit is not None:
                _PARTS_CACHE.move_to_end(raw)
                return hit
    found: list[_HtmlPart] = []
    _walk(raw, 0, len(raw), found, 0)
    parts = tuple(found)
    if small:
        with _PARTS_CACHE_LOCK:
            _PARTS_CACHE[raw] = parts
            if len(_PARTS_CACHE) > _PARTS_CACHE_ENTRIES:
                _PARTS_CACHE.popitem(last=False)
    return parts


def _walk(raw: bytes, start: int, end: int, out: list[_HtmlPart], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise Unparsable("too deeply nested")
    if raw.startswith(b"\r\n", start, end):
        header, body = b"", start + 2
    else:
        sep = raw.find(b"\r\n\r\n", start, end)
        if sep < 0:
            return  # no body
        header, body = raw[start : sep + 2], sep + 4
    headers = message_from_bytes(header + b"\r\n", policy=compat32)
    ctype = headers.get_content_type()
    if ctype.startswith("multipart/"):
        boundary = headers.get_boundary()
        if ctype in _OPAQUE_MULTIPART or not boundary:
            return
        for part_start, part_end in split_multipart(raw, body, end, boundary.encode("ascii", "surrogateescape")):
            _walk(raw, part_start, part_end, out, depth + 1)
        return
    if ctype == "text/html" and headers.get_content_disposition() != "attachment":
        cte = str(headers.get("content-transfer-encoding", "7bit")).strip().lower()
        decoded = _decode(memoryview(raw)[body:end], cte, headers.get_content_charset() or "us-ascii")
        if decoded is not None:
            text, codec, errors = decoded
            out.append(_HtmlPart(body, end, cte, codec, errors, text, _scan(text)))


def split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Body ranges of a multipart's parts, per RFC 2046: each delimiter's leading CRLF belongs to it.
    A delimiter is "--" boundary ["--"] [ \t]* at the start of the body or after a CRLF, then
    CRLF or the end; found with bytes.find (a regex with that start tried every position)."""
    marker = b"--" + boundary
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while (i := raw.find(marker, pos, end)) >= 0:
        at = i if i == start else i - 2  # where the delimiter starts: its CRLF
        if at < pos or (at != i and not raw.startswith(b"\r\n", at)):
            pos = i + 1
            continue
        after = i + len(marker)
        closing = raw.startswith(b"--", after, end) and (_line_end(raw, after + 2, end) is not None)
        stop = _line_end(raw, after + 2 if closing else after, end)
        if stop is None:
            pos = i + 1
            continue
        if part_start is not None:
            if at < part_start:
                raise Unparsable("delimiter lines without a part between them")
            ranges.append((part_start, at))
        if closing:
            return ranges
        part_start = stop + 2
        pos = stop
    if part_start is not None and part_start <= end:
        ranges.append((part_start, end))  # no close delimiter: the last part runs to the end
    return ranges


def _line_end(raw: bytes, k: int, end: int) -> int | None:
    """Past spaces and tabs from ``k``: the position of the CRLF or the end there, else None."""
    while k < end and raw[k] in (0x20, 0x09):
        k += 1
    return k if k == end or raw.startswith(b"\r\n", k, end) else None


def _decode(data: bytes | memoryview, cte: str, charset: str) -> tuple[str, str, str] | None:
    """The text, and the codec and error handler that turn it back into the same bytes; None when undecodable."""
    if cte == "base64":
        try:
            data = base64.b64decode(data)
        except (ValueError, binascii.Error):
            return None
    elif cte == "quoted-printable":
        data = binascii.a2b_qp(data)
    elif cte not in _PLAIN_CTES:
        return None
    try:
        codec = codecs.lookup(charset).name
        for errors in ("strict", "surrogateescape"):
            try:
                text = str(data, codec, errors)
                if (errors == "strict" and codec in _EXACT_CODECS) or text.encode(codec, errors) == data:
                    return text, codec, errors
            except UnicodeError:
                continue
        if "<a href=x>".encode(codec) != b"<a href=x>":
            return None
    except (LookupError, UnicodeError):
        return None
    return str(data, "latin-1"), "latin-1", "strict"  # an ASCII-compatible charset: scan its bytes as latin-1


def _encode(part: _HtmlPart, text: str, original: bytes) -> bytes:
    data = text.encode(part.codec, part.errors)
    if part.cte == "base64":
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
        return encoded + original[len(original.rstrip(b"\r\n")) :]
    if part.cte == "quoted-printable":
        lines = (binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=\r\n") for line in data.split(b"\r\n"))
        return b"\r\n".join(lines)
    return data


# --- the rewrite ---------------------------------------------------------------------------------------------------


def has_html(raw: bytes) -> bool:
    """Cheap pre-check: False means the message surely has no text/html part."""
    return re.search(rb"(?i)text/html", raw) is not None


def trackable_links(raw: bytes) -> list[str]:
    """The http(s) URLs of the trackable links in the message's HTML, in ordinal order."""
    if not has_html(raw):
        return []
    try:
        return [link.url for part in _html_parts(raw) for link in part.scan.links]
    except Exception as exc:
        log.info("tracking: no trackable links, message not parsable (%s)", type(exc).__name__)
        return []


def rewrite(raw: bytes, *, base_url: str, signer: TokenSigner, recipient_id: int, opens: bool, clicks: bool) -> bytes:
    """The message with its text/html parts rewritten for one recipient; ``raw`` itself when that fails."""
    if not (opens or clicks) or not has_html(raw):
        return raw
    try:
        return _rewrite(raw, base_url.rstrip("/"), signer, recipient_id, opens=opens, clicks=clicks)
    except Exception as exc:
        log.info("tracking: message left unchanged, rewrite failed (%s)", type(exc).__name__)
        return raw


def _rewrite(raw: bytes, base_url: str, signer: TokenSigner, recipient_id: int, *, opens: bool, clicks: bool) -> bytes:
    pixel = ""
    if opens:
        src = _attr_escape(f"{base_url}/t/o/{signer.open_token(recipient_id)}")
        pixel = f'<img src="{src}" width="1" height="1" alt="" style="display:none;border:0">'
    out: list[bytes] = []
    done = 0
    ordinal = 0
    for part in _html_parts(raw):
        edits: list[_Edit] = []
        for link in part.scan.links:
            if clicks:
                href = _attr_escape(f"{base_url}/t/c/{signer.click_token(recipient_id, ordinal)}")
                edits.append((link.start, link.end, f'"{href}"', f'"{href}"\r\n'))
            ordinal += 1
        if opens:
            at = part.scan.body_close
            if at is None:
                at = len(part.text.rstrip("\r\n"))
            edits.append((at, at, pixel, "\r\n" + pixel))
        if not edits:
            continue
        edits.sort(key=lambda e: e[0])
        original = raw[part.start : part.end]
        body = _encode(part, _apply(part.text, edits, breaks=False), original)
        if part.cte in _PLAIN_CTES and _longest_line(body) > max(_MAX_LINE, _longest_line(original)):
            # SMTP's line limit: break lines after the new values, where HTML allows whitespace
            body = _encode(part, _apply(part.text, edits, breaks=True), original)
        out += (raw[done : part.start], body)
        done = part.end
    out.append(raw[done:])
    return b"".join(out)


def _apply(text: str, edits: list[_Edit], *, breaks: bool) -> str:
    pieces: list[str] = []
    pos = 0
    for start, end, replacement, broken in edits:
        pieces += (text[pos:start], broken if breaks else replacement)
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def _longest_line(data: bytes) -> int:
    return max(map(len, data.split(b"\r\n")))


def _attr_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;")
