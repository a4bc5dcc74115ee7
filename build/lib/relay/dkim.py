"""DKIM: the keys of the [[dkim]] entries, signing outbound mail, and what `relay dkim` prints.

The only module that imports dkimpy (signing) and cryptography (reading and making PEM keys).
Keys are read and checked once, at start (``load_keys``): a key that is missing, unreadable,
not a private key, RSA under 2048 bits, or not of the entry's algorithm is a ``StartError``
naming the file. Signing (``Signer``) never raises: a message it cannot sign goes out unsigned,
and the reason is logged.

What is signed: relaxed/relaxed; the header fields dkimpy signs by default plus
``List-Unsubscribe-Post`` (RFC 8058); ``From``, ``To``, ``Subject``, ``Date`` and
``Message-ID`` listed once more than they occur (oversigned: adding one breaks the signature);
never ``Return-Path``, ``Received``, ``Bcc``; not ``X-Relay-Ref`` (VERP's token, added per
recipient: left out so that the signature covers only what the sender wrote and tracking).
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim as dkimpy
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from relay.config import Config, DkimConfig
from relay.errors import StartError, one_line

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
# Signed as often as they occur, as dkimpy does by default; RFC 8058 needs List-Unsubscribe-Post.
SIGNED = frozenset(name.decode() for name in dkimpy.DKIM.SHOULD) | {"list-unsubscribe-post"}
OVERSIGNED = ("from", "to", "subject", "date", "message-id")  # listed one more time than they occur
NEVER_SIGNED = frozenset({"return-path", "received", "bcc"})
_LABEL = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")


class _RsaKey:
    """An RSA key parsed once, whose signatures OpenSSL makes (through cryptography).

    dkimpy 1.1.8 (pinned) parses the PEM again for every signature and signs in pure Python:
    ~7 ms of CPU per RSA-2048 signature, against ~0.3 ms here. Its two module-level hooks
    (``parse_pem_private_key``, ``RSASSA_PKCS1_v1_5_sign``) are wrapped, at import, to take
    this object and to hand anything else to dkimpy's own code; canonicalization, hashing and
    the header field are dkimpy's. Tests verify what is signed with dkimpy's own verifier."""

    __slots__ = ("key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key

    def sign(self, digest: bytes) -> bytes:
        return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def _install_openssl_rsa() -> None:
    parse, sign = dkimpy.parse_pem_private_key, dkimpy.RSASSA_PKCS1_v1_5_sign

    def parse_key(data: Any) -> Any:
        return data if isinstance(data, _RsaKey) else parse(data)

    def sign_hash(hasher: Any, key: Any) -> Any:
        return key.sign(hasher.digest()) if isinstance(key, _RsaKey) else sign(hasher, key)

    dkimpy.parse_pem_private_key = parse_key
    dkimpy.RSASSA_PKCS1_v1_5_sign = sign_hash


_install_openssl_rsa()


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One [[dkim]] entry with its key, read once at start."""

    domain: str
    subdomains: bool
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    key_file: str
    private: bytes | _RsaKey  # as dkimpy takes it: base64 of the 32-byte seed (Ed25519); see _RsaKey
    public: str  # base64, the p= of the DNS record

    @property
    def k(self) -> str:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    def covers(self, domain: str) -> bool:
        return domain == self.domain or (self.subdomains and domain.endswith("." + self.domain))

    def txt_value(self) -> str:
        return f"v=DKIM1; k={self.k}; p={self.public}"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True, slots=True)
class Signed:
    """A message with its DKIM-Signature fields in front, and what they are (``d``, ``s``, ``a``)."""

    body: bytes
    signatures: tuple[dict[str, str], ...]


# -- keys -------------------------------------------------------------------------------------


def load_keys(config: Config) -> tuple[DkimKey, ...]:
    """Every [[dkim]] entry's key, read and checked; StartError naming the first bad file."""
    return tuple(load_key(entry, f"dkim[{i}]") for i, entry in enumerate(config.dkim))


def load_key(entry: DkimConfig, where: str = "dkim") -> DkimKey:
    path = entry.key_file

    def bad(problem: str) -> StartError:
        return StartError(f"{where}: cannot use the DKIM key {path}: {problem}")

    try:
        with open(path, "rb") as f:
            pem = f.read(1024 * 1024)  # a PEM key is a few kB; never read a huge file whole
    except OSError as exc:
        raise bad(one_line(exc, filename=False)) from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # encrypted
        raise bad("the key is encrypted (Relay needs it without a passphrase)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise bad("not a PEM private key") from exc
    return _key(entry, key, bad)


def _key(entry: DkimConfig, key: object, bad: Callable[[str], Exception]) -> DkimKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if entry.algorithm != "rsa-sha256":
            raise bad(f"an RSA key, but the entry's algorithm is {entry.algorithm}")
        if key.key_size < MIN_RSA_BITS:
            raise bad(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} needed)")
        private: bytes | _RsaKey = _RsaKey(key)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        if entry.algorithm != "ed25519-sha256":
            raise bad(f"an Ed25519 key, but the entry's algorithm is {entry.algorithm}")
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        private = base64.b64encode(seed)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise bad(f"a {type(key).__name__.removeprefix('_')} key; DKIM keys are RSA or Ed25519")
    return DkimKey(
        entry.domain.lower(), entry.subdomains, entry.selector, entry.algorithm, entry.key_file, private,
        base64.b64encode(public).decode(),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class NewKey:
    path: Path
    key: DkimKey


def generate(data_dir: Path, domain: str, selector: str, algorithm: str = "rsa-sha256") -> NewKey:
    """Make a key under ``data_dir/dkim/`` (0700), as ``{domain}.{selector}.pem`` (0600).
    FileExistsError when that file exists: a published key is never overwritten."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        raise ValueError(f"not a domain name: {domain!r}")
    if not _SELECTOR.fullmatch(selector):
        raise ValueError(f"not a valid DKIM selector: {selector!r}")
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    folder = data_dir / "dkim"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid == os.geteuid():
        folder.chmod(0o700)
    path = folder / f"{domain}.{selector}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
    finally:
        os.close(fd)
    entry = DkimConfig(domain=domain, selector=selector, key_file=str(path), algorithm=algorithm)
    return NewKey(path, _key(entry, key, ValueError))


def config_snippet(key: DkimKey) -> str:
    return (
        f'[[dkim]]\ndomain = "{key.domain}"\nsubdomains = false\nselector = "{key.selector}"\n'
        f'key_file = "{key.key_file}"\nalgorithm = "{key.algorithm}"\n'
    )


def zone_line(key: DkimKey) -> str:
    """The record as a zone-file line: TXT strings are at most 255 bytes, so a long value is split."""
    value = key.txt_value()
    chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{key.record_name}. IN TXT ( {chunks} )"


def record_verdict(key: DkimKey, records: Sequence[str]) -> tuple[bool, str]:
    """Does one of the TXT records at the key's name publish this key? (ok, why)"""
    dkim_records = [tags for tags in map(_tags, records) if tags.get("v", "DKIM1") == "DKIM1" and "p" in tags]
    if not dkim_records:
        return False, "missing record" + (" (TXT there, but no DKIM1 key in it)" if records else "")
    for tags in dkim_records:
        if tags.get("k", "rsa").lower() == key.k and tags["p"] == key.public:
            return True, "ok"
    if all(not tags["p"] for tags in dkim_records):
        return False, "different key: the record revokes it (empty p=)"
    return False, "different key: the record publishes another public key"


def _tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), re.sub(r"\s+", "", value))
    return tags


# -- signing ----------------------------------------------------------------------------------


class Signer:
    """Signs with the keys of the [[dkim]] entries that cover a message's From: domain: those
    of the most specific domain (an entry for news.example.com wins over example.com with
    subdomains), one DKIM-Signature each. ``keys_for`` is cheap (the header section only);
    ``sign`` costs ~1 ms of CPU per RSA key: run it off the event loop."""

    def __init__(self, keys: Sequence[DkimKey]) -> None:
        self.keys = tuple(keys)

    def keys_for(self, message: bytes) -> tuple[tuple[DkimKey, ...], str]:
        """The keys to sign ``message`` with, or () and why none."""
        domain, why = from_domain(message)
        if domain is None:
            return (), why
        covering = [k for k in self.keys if k.covers(domain)]
        if not covering:
            return (), f"no [[dkim]] entry for {domain}"
        best = max(len(k.domain) for k in covering)
        return tuple(k for k in covering if len(k.domain) == best), ""

    def sign(self, message: bytes, keys: Sequence[DkimKey]) -> Signed:
        """The message with one DKIM-Signature per key in front; unchanged (and the reason
        logged) when dkimpy refuses it."""
        try:
            signer = dkimpy.DKIM(message, linesep=b"\r\n")
            names = [name.decode("ascii").lower() for name, _ in signer.headers]
            include = [n for n in names if n in SIGNED] + list(OVERSIGNED)
            headers = [n.encode() for n in include]
            fields = [
                signer.sign(
                    k.selector.encode(),
                    k.domain.encode(),
                    k.private,
                    signature_algorithm=k.algorithm.encode(),
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=headers,
                )
                for k in keys
            ]
        except Exception as exc:  # dkimpy's errors, and whatever a hostile header makes of its parser
            log.warning("not signed with DKIM: %s", one_line(exc))
            return Signed(message, ())
        return Signed(
            b"".join(fields) + message,
            tuple({"d": k.domain, "s": k.selector, "a": k.algorithm} for k in keys),
        )


def from_domain(message: bytes) -> tuple[str | None, str]:
    """The domain of the message's one From: address, or None and why not."""
    try:
        headers, _ = dkimpy.rfc822_parse(_header_section(message))
    except Exception as exc:  # a header line dkimpy cannot parse; it could not sign it either
        return None, f"unparsable header section ({one_line(exc)[:100]})"
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None, f"{len(values)} From: fields" if values else "no From: field"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [a for _, a in getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None, f"From: is not one address ({text.strip()[:100]!r})"
    domain = addresses[0].rsplit("@", 1)[1].strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None, f"From: domain is not a domain name ({domain[:100]!r})"
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        return None, f"From: domain is not a domain name ({domain[:100]!r})"
    return domain, ""


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]
