"""What the DKIM tests share: keys made by Relay's own keygen, and the verifier's DNS lookup,
which asks the loopback DNS server (the ``zone`` fixture) for real."""

from __future__ import annotations

import email
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.rdatatype
import dns.resolver
from helpers.peers import Zone

from relay import dkim

Lookup = Callable[..., bytes | None]


@dataclass(frozen=True)
class Keys:
    rsa: dkim.NewKey
    ed25519: dkim.NewKey
    other_rsa: dkim.NewKey  # the same domain and selector as `rsa`, another key


def publish(zone: Zone, *new: dkim.NewKey) -> None:
    for n in new:
        zone.txt(n.key.record_name, n.key.txt_value())


def dns_lookup(zone: Zone) -> Lookup:
    """dkimpy's dnsfunc: the TXT record, over UDP/TCP to the test's DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = zone.port  # type: ignore[attr-defined]
    resolver.lifetime = 5

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    return lookup


def signatures(message: bytes) -> list[dict[str, str]]:
    """The DKIM-Signature fields of a message, as tag -> value (whitespace removed)."""
    out = []
    for value in email.message_from_bytes(message).get_all("DKIM-Signature") or []:
        tags = {}
        for part in str(value).split(";"):
            name, _, v = part.partition("=")
            tags[name.strip()] = "".join(v.split())
        out.append(tags)
    return out


def signed_names(sig: dict[str, str]) -> list[str]:
    return [n.strip().lower() for n in sig["h"].split(":")]


def entry(n: dkim.NewKey, **more: object) -> dict[str, object]:
    k = n.key
    return {"domain": k.domain, "selector": k.selector, "key_file": str(n.path), "algorithm": k.algorithm, **more}


def config_text(*entries: dict[str, object]) -> str:
    """[[dkim]] tables for a TOML config."""
    out = []
    for e in entries:
        out.append("[[dkim]]")
        out.extend(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(str(v))}" for k, v in e.items())
    return "\n".join(out).replace("'", '"') + "\n"


def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
