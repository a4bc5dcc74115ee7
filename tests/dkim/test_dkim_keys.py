"""DKIM keys at start: a missing, unreadable, weak or wrong key stops `relay serve` with one line
naming the file, before anything listens; and what the signer signs, whatever the headers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim_support import Keys, config_text, entry, signatures, signed_names
from helpers import make_config, relay_cli, serve_config

from relay import dkim
from relay.errors import StartError
from relay.service.lifecycle import Relay


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def bad_keys(tmp_path: Path, keys: Keys) -> dict[str, tuple[dict[str, object], str]]:
    """name -> ([[dkim]] entry, the problem the start names)."""
    (tmp_path / "a-directory.pem").mkdir()
    (tmp_path / "rsa1024.pem").write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    (tmp_path / "ec.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    encrypted = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (tmp_path / "encrypted.pem").write_bytes(encrypted)
    base = entry(keys.rsa)
    return {
        "missing": ({**base, "key_file": str(tmp_path / "missing.pem")}, "no such file or directory"),
        "unreadable": ({**base, "key_file": str(tmp_path / "a-directory.pem")}, "is a directory"),
        "rsa 1024": ({**base, "key_file": str(tmp_path / "rsa1024.pem")}, "an RSA key of 1024 bits"),
        "garbage": ({**base, "key_file": str(tmp_path / "garbage.pem")}, "not a PEM private key"),
        "ec key": ({**base, "key_file": str(tmp_path / "ec.pem")}, "DKIM keys are RSA or Ed25519"),
        "encrypted": ({**base, "key_file": str(tmp_path / "encrypted.pem")}, "the key is encrypted"),
        "rsa as ed25519": (
            {**base, "algorithm": "ed25519-sha256"},
            "an RSA key, but the entry's algorithm is ed25519-sha256",
        ),
        "ed25519 as rsa": (
            {**entry(keys.ed25519), "algorithm": "rsa-sha256"},
            "an Ed25519 key, but the entry's algorithm is rsa-sha256",
        ),
    }  # fmt: skip


CASES = ["missing", "unreadable", "rsa 1024", "garbage", "ec key", "encrypted", "rsa as ed25519", "ed25519 as rsa"]


@pytest.mark.parametrize("case", CASES)
async def test_a_bad_key_fails_the_start_naming_the_file(tmp_path: Path, keys: Keys, case: str) -> None:
    bad, problem = bad_keys(tmp_path, keys)[case]
    config = make_config(tmp_path, dkim=[entry(keys.ed25519), bad])
    relay = Relay(config)
    with pytest.raises(StartError) as failed:
        await relay.startup(deliver=True)
    message = str(failed.value)
    assert message.startswith(f"dkim[1]: cannot use the DKIM key {bad['key_file']}: "), message
    assert problem in message
    assert "\n" not in message
    assert relay.store is None  # failed before the store opened, and before anything listened


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_relay_serve_says_it_in_one_line(tmp_path: Path, keys: Keys, processes: str) -> None:
    missing = tmp_path / "nope" / "example.com.rsa1.pem"
    config = serve_config(tmp_path, config_text({**entry(keys.rsa), "key_file": str(missing)}))
    code, out, err = await relay_cli("serve", "--config", str(config), "--processes", processes)
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"relay: dkim[0]: cannot use the DKIM key {missing}: no such file or directory"]
    assert not (tmp_path / "data" / "relay.db").exists()  # nothing started: not even the store


async def test_relay_serve_names_the_bad_key_among_good_ones(tmp_path: Path, keys: Keys) -> None:
    rsa1024 = tmp_path / "rsa1024.pem"
    rsa1024.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    config = serve_config(tmp_path, config_text(entry(keys.rsa), {**entry(keys.rsa), "key_file": str(rsa1024)}))
    code, _, err = await relay_cli("serve", "--config", str(config))
    assert code == 1
    assert err.splitlines() == [
        f"relay: dkim[1]: cannot use the DKIM key {rsa1024}: an RSA key of 1024 bits (at least 2048 needed)"
    ]


def test_the_signer_never_signs_trace_fields_or_bcc(keys: Keys) -> None:
    message = (
        b"Return-Path: <app@example.com>\r\nReceived: from a by b\r\nReceived: from c by d\r\n"
        b"From: app@example.com\r\nTo: a@x.test\r\nTo: b@x.test\r\nBcc: c@x.test\r\nResent-Bcc: d@x.test\r\n"
        b"Comments: hi\r\nX-Relay-Ref: abc\r\n\r\nbody\r\n"
    )
    signer = dkim.Signer([keys.rsa.key])
    found, why = signer.keys_for(message)
    assert (found, why) == ((keys.rsa.key,), "")
    signed = signer.sign(message, found)
    (sig,) = signatures(signed.body)
    names = signed_names(sig)
    assert names.count("to") == 3  # twice in the message: listed three times
    assert names.count("subject") == 1  # absent: listed once (none may be added)
    assert names.count("date") == 1
    assert not {"return-path", "received", "bcc", "resent-bcc", "comments", "x-relay-ref"} & set(names)
    assert signed.body.endswith(message)
    assert signed.signatures == ({"d": "example.com", "s": "rsa1", "a": "rsa-sha256"},)


def test_the_most_specific_entry_signs(keys: Keys, tmp_path: Path) -> None:
    news = dkim.generate(tmp_path, "news.example.com", "n1", "ed25519-sha256").key
    parent = replace(keys.rsa.key, subdomains=True)
    signer = dkim.Signer([parent, news])
    assert signer.keys_for(b"From: a@news.example.com\r\n\r\n")[0] == (news,)
    assert signer.keys_for(b"From: a@deep.news.example.com\r\n\r\n")[0] == (parent,)
    assert signer.keys_for(b"From: a@EXAMPLE.COM\r\n\r\n")[0] == (parent,)
    assert signer.keys_for(b"From: a@badexample.com\r\n\r\n") == ((), "no [[dkim]] entry for badexample.com")


def test_what_dkimpy_cannot_sign_goes_out_unchanged(keys: Keys) -> None:
    message = b"From: app@example.com\r\nbroken header line\r\n\r\nbody\r\n"
    signed = dkim.Signer([keys.rsa.key]).sign(message, [keys.rsa.key])
    assert signed == dkim.Signed(message, ())


def test_dkimpy_keeps_its_own_rsa_for_other_keys(keys: Keys) -> None:
    """relay.dkim gives dkimpy OpenSSL's RSA for the keys it loaded; a PEM passed to dkimpy
    directly still goes through dkimpy's own code."""
    private = keys.rsa.path.read_bytes()
    message = b"From: app@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    field = dkimpy.sign(message, b"rsa1", b"example.com", private)
    record = keys.rsa.key.txt_value().encode()
    assert dkimpy.verify(field + message, dnsfunc=lambda name, timeout=5: record)
