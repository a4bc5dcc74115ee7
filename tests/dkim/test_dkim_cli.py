"""`relay dkim keygen` and `relay dkim check`, as a user runs them, against the loopback DNS server."""

from __future__ import annotations

import asyncio
import re
import stat
import sys
from pathlib import Path

import dkim as dkimpy
from dkim_support import Keys, config_text, dns_lookup, entry, publish
from helpers import relay_cli, write_config
from helpers.peers import Zone

from relay import dkim

DK = "_domainkey.example.com"  # a record's name is f"{selector}.{DK}"
MESSAGE = b"From: App <app@example.com>\r\nTo: jane@dest.test\r\nSubject: Hi\r\n\r\nHello\r\n"


def config(tmp_path: Path, zone: Zone | None = None, extra: str = "") -> Path:
    dns = f'[dns]\nnameservers = ["127.0.0.1:{zone.port}"]\ntimeout = "2s"\n' if zone else ""  # type: ignore[attr-defined]
    return write_config(
        tmp_path / "relay.toml", f'[server]\nhostname = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n{dns}{extra}'
    )


def printed(out: str, label: str) -> str:
    m = re.search(rf"^  {label}:\s+(.*)$", out, re.M)
    assert m, out
    return m.group(1)


async def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(tmp_path: Path, zone: Zone) -> None:
    cfg = config(tmp_path)
    for selector, algorithm, k in (("s2026", "rsa-sha256", "rsa"), ("e2026", "ed25519-sha256", "ed25519")):
        args = ["--algorithm", algorithm] if algorithm != "rsa-sha256" else []
        code, out, err = await relay_cli("dkim", "keygen", "Example.COM", selector, "--config", str(cfg), *args)
        assert (code, err) == (0, ""), err
        path = tmp_path / "data" / "dkim" / f"example.com.{selector}.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        name, value = printed(out, "name"), printed(out, "value")
        assert name == f"{selector}._domainkey.example.com"
        assert value.startswith(f"v=DKIM1; k={k}; p=")
        assert f'key_file = "{path}"' in out
        assert f'algorithm = "{algorithm}"' in out
        # The [[dkim]] snippet is a working entry: paste it, publish the record, sign, verify.
        snippet = out[out.index("[[dkim]]") :]
        key = dkim.load_keys(_parse(tmp_path, snippet))[0]
        assert key.algorithm == algorithm
        zone.txt(name, value)
        signer = dkim.Signer([key])
        signed = signer.sign(MESSAGE, signer.keys_for(MESSAGE)[0])
        assert dkimpy.verify(signed.body, dnsfunc=dns_lookup(zone))


async def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    code, _, _ = await relay_cli("dkim", "keygen", "example.com", "s1", "--config", str(cfg))
    assert code == 0
    path = tmp_path / "data" / "dkim" / "example.com.s1.pem"
    before = path.read_bytes()
    code, out, err = await relay_cli(
        "dkim", "keygen", "example.com", "s1", "--algorithm", "ed25519-sha256", "--config", str(cfg)
    )
    assert (code, out) == (1, "")
    assert err == f"relay: {path} exists: not overwriting a key (pick another selector)\n"
    assert path.read_bytes() == before


async def test_keygen_refuses_names_that_are_not_names(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    for domain, selector in (("../../etc", "s1"), ("example.com", "a/b"), ("example.com", "")):
        code, out, err = await relay_cli("dkim", "keygen", domain, selector, "--config", str(cfg))
        assert (code, out) == (2, ""), err
        assert err.startswith("relay: not a "), err
    assert not (tmp_path / "data" / "dkim").exists() or not any((tmp_path / "data" / "dkim").iterdir())


async def test_check_says_per_selector_whether_the_record_matches(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    cfg = config(tmp_path, zone, config_text(entry(keys.rsa), entry(keys.ed25519)))
    check = ("dkim", "check", "example.com", "--config", str(cfg))

    code, out, _ = await relay_cli(*check)  # nothing published
    assert code == 1
    assert out.splitlines() == [
        f"rsa1 (rsa-sha256) rsa1.{DK}: missing record",
        f"ed1 (ed25519-sha256) ed1.{DK}: missing record",
    ]

    publish(zone, keys.rsa, keys.ed25519)
    code, out, err = await relay_cli(*check)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"rsa1 (rsa-sha256) rsa1.{DK}: ok",
        f"ed1 (ed25519-sha256) ed1.{DK}: ok",
    ]

    publish(zone, keys.other_rsa)  # another key at rsa1's name
    code, out, _ = await relay_cli(*check)
    assert code == 1
    assert out.splitlines()[0] == (
        f"rsa1 (rsa-sha256) rsa1.{DK}: different key: the record publishes another public key"
    )
    assert out.splitlines()[1].endswith(": ok")

    zone.txt(f"rsa1.{DK}", "v=DKIM1; k=rsa; p=")  # revoked
    zone.servfail(f"ed1.{DK}")
    code, out, _ = await relay_cli(*check)
    assert code == 1
    rsa_line, ed_line = out.splitlines()
    assert rsa_line.endswith("different key: the record revokes it (empty p=)")
    assert ed_line.startswith(f"ed1 (ed25519-sha256) ed1.{DK}: DNS lookup of ")


async def test_check_a_domain_without_entries(tmp_path: Path, zone: Zone, keys: Keys) -> None:
    cfg = config(tmp_path, zone, config_text(entry(keys.rsa)))
    code, out, err = await relay_cli("dkim", "check", "other.test", "--config", str(cfg))
    assert (code, out, err) == (1, "", "relay: no [[dkim]] entry for other.test in the config\n")


def _parse(tmp_path: Path, snippet: str) -> object:
    from relay import config as cfgmod

    return cfgmod.load(str(write_config(tmp_path / "snippet.toml", snippet)))


async def test_the_signing_benchmark_runs(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "dkim_sign.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(bench), "--n", "20", "--out", str(tmp_path / "dkim.md"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    table = (tmp_path / "dkim.md").read_text()
    assert "| RSA 2048 (rsa-sha256) |" in table
    assert "| Ed25519 (ed25519-sha256) |" in table
