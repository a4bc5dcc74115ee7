"""Where mail for a domain goes: MX lookup and host addresses, on dnspython's async resolver.

The only module that imports dnspython; its exceptions become delivery failures here:

    NXDOMAIN                         -> PermanentFailure 5.1.2
    null MX (RFC 7505)               -> PermanentFailure 5.1.10
    no MX, no A/AAAA for the domain  -> PermanentFailure 5.1.2
    SERVFAIL, timeout, no nameserver -> TemporaryFailure 4.4.3

Answers are cached for their TTL: dnspython's cache, and in front of it what this module made
of them (delivery asks for the same few domains thousands of times a second; a cached lookup
through dnspython still costs ~20 us, and a NoAnswer an exception).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.config import DnsConfig
from relay.errors import PermanentFailure, TemporaryFailure

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str
    preference: int


class MxResolver:
    def __init__(self, config: DnsConfig) -> None:
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in config.nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.timeout = config.timeout
        resolver.lifetime = config.timeout
        resolver.cache = dns.resolver.Cache()
        self._resolver = resolver
        # (name, type) -> (expires at, records): records None means NoAnswer (no such records)
        self._memo: dict[tuple[str, int], tuple[float, list[object] | None]] = {}

    async def _records(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[object] | None:
        """The records of a name and type, None when it has none (NoAnswer); raises dnspython's
        errors, which are never cached here."""
        key = (name, rdtype)
        hit = self._memo.get(key)
        if hit is not None and hit[0] > time.time():
            return hit[1]
        answer = await self._resolver.resolve(_absolute(name), rdtype, search=False, raise_on_no_answer=False)
        records = None if answer.rrset is None else list(answer.rrset)
        if len(self._memo) >= 10_000:  # many domains: start again rather than grow
            self._memo.clear()
        self._memo[key] = (answer.expiration, records)
        return records

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The domain's mail exchangers, best first; equal preferences in random order.
        A domain without MX records is its own exchanger (implicit MX)."""
        try:
            answer = await self._records(domain, dns.rdatatype.MX)
        except Exception as exc:
            raise _failure(exc, domain, "MX") from exc
        if answer is None:
            return [MxHost(domain, 0)]
        hosts = [MxHost(str(r.exchange).rstrip(".").lower(), int(r.preference)) for r in answer]  # type: ignore[attr-defined]
        if any(h.name == "" for h in hosts):
            raise PermanentFailure(None, "5.1.10", f"{domain} does not accept mail (null MX)")
        random.shuffle(hosts)
        hosts.sort(key=lambda h: h.preference)  # stable: equal preferences stay shuffled
        return hosts

    async def txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each one string (its strings joined); [] when there are
        none or the name does not exist. DNS trouble is a TemporaryFailure (``relay dkim check``)."""
        try:
            answer = await self._resolver.resolve(_absolute(name), dns.rdatatype.TXT, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except Exception as exc:
            raise _failure(exc, name, "TXT") from exc
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of a host; [] when it has none."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        kinds = (dns.rdatatype.A, dns.rdatatype.AAAA)
        hits = [self._memo.get((host, t)) for t in kinds]
        now = time.time()
        results: list[list[str] | BaseException]
        if all(hit is not None and hit[0] > now for hit in hits):  # no tasks for the usual case
            results = [[r.address for r in hit[1] or ()] for hit in hits if hit is not None]  # type: ignore[attr-defined]
        else:
            results = await asyncio.gather(*(self._lookup(host, t) for t in kinds), return_exceptions=True)
        addresses: list[str] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                addresses.extend(result)
        if not addresses and errors:
            temporary = [e for e in errors if isinstance(e, TemporaryFailure)]
            raise temporary[0] if temporary else errors[0]
        return addresses

    async def _lookup(self, host: str, rdtype: dns.rdatatype.RdataType) -> list[str]:
        try:
            answer = await self._records(host, rdtype)
        except Exception as exc:
            raise _failure(exc, host, rdtype.name) from exc
        return [] if answer is None else [r.address for r in answer]  # type: ignore[attr-defined]


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _failure(exc: Exception, name: str, rdtype: str) -> Exception:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return PermanentFailure(None, "5.1.2", f"Host or domain name not found: {name} (NXDOMAIN)")
    if isinstance(exc, dns.resolver.NoNameservers):
        return TemporaryFailure(None, "4.4.3", f"DNS lookup of {name} {rdtype} failed: SERVFAIL")
    if isinstance(exc, dns.exception.Timeout):
        return TemporaryFailure(None, "4.4.3", f"DNS lookup of {name} {rdtype} timed out")
    if isinstance(exc, dns.name.NameTooLong | dns.name.LabelTooLong | dns.name.EmptyLabel | UnicodeError):
        return PermanentFailure(None, "5.1.2", f"Bad domain name: {name}")
    if isinstance(exc, dns.exception.DNSException | OSError):
        return TemporaryFailure(None, "4.4.3", f"DNS lookup of {name} {rdtype} failed: {type(exc).__name__}")
    return exc
