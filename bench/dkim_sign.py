"""The CPU cost of DKIM signing, per 1,000 messages of 2 KB, as delivery pays it.

Times ``Signer.keys_for`` + ``Signer.sign`` (what relay.delivery runs per recipient transaction,
the signing in a worker thread) with keys made by ``relay dkim keygen``'s code: RSA 2048,
Ed25519, and both side by side; and, for reference, dkimpy's own pure-Python RSA on the same
message, which relay.dkim does not use. Prints a Markdown table (``--out`` also writes it):

    .venv/bin/python bench/dkim_sign.py [--n 1000] [--out bench/results/dkim.md]

Named dkim_sign.py, not dkim.py: run as a script, bench/ comes first on sys.path, and a
bench/dkim.py would shadow dkimpy's ``dkim`` package.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy

from relay.dkim import Signer, generate


def message(size: int = 2048) -> bytes:
    head = (
        b"From: App <app@example.com>\r\nTo: Jane Doe <jane@dest.example>\r\nSubject: Your receipt #1234\r\n"
        b"Date: Thu, 03 Dec 2026 17:00:00 +0000\r\nMessage-ID: <receipt-1234@example.com>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"List-Unsubscribe: <https://example.com/u/1234>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Received: from app (app.example.com [192.0.2.1]) by relay.test with ESMTP id 01ABC\r\n\r\n"
    )
    line = b"Thank you for your order. Here is what you bought and what it cost.\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    return head + body


def cpu_ms_per_1000(n: int, fn: Callable[[], object]) -> float:
    fn()  # warm up
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) * 1000 / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000, help="messages per measurement (default 1000)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()

    msg = message()
    with tempfile.TemporaryDirectory() as tmp:
        rsa = generate(Path(tmp), "example.com", "rsa1").key
        ed = generate(Path(tmp), "example.com", "ed1", "ed25519-sha256").key
        pem = (Path(tmp) / "dkim" / "example.com.rsa1.pem").read_bytes()

    def signing(*keys: object) -> Callable[[], object]:
        signer = Signer(keys)  # type: ignore[arg-type]
        return lambda: signer.sign(msg, signer.keys_for(msg)[0])

    unmatched = Signer([rsa])
    other = msg.replace(b"app@example.com", b"app@other.example")
    rows = [
        ("no [[dkim]] entry for the From: domain (keys_for only)", args.n, lambda: unmatched.keys_for(other)),
        ("RSA 2048 (rsa-sha256)", args.n, signing(rsa)),
        ("Ed25519 (ed25519-sha256)", args.n, signing(ed)),
        ("RSA 2048 + Ed25519 (two signatures)", args.n, signing(rsa, ed)),
        (
            "for reference: dkimpy's own pure-Python RSA 2048",
            max(args.n // 10, 10),
            lambda: dkimpy.sign(msg, b"rsa1", b"example.com", pem, canonicalize=(b"relaxed", b"relaxed")),
        ),
    ]
    lines = [
        f"DKIM signing, CPU per 1,000 messages of {len(msg)} bytes (relaxed/relaxed), one core;"
        f" Python {platform.python_version()}, {platform.machine()}, dkimpy {dkimpy_version()}",
        "",
        "| what | CPU ms / 1,000 messages | per message |",
        "|---|---:|---:|",
    ]
    for name, n, fn in rows:
        per_1000 = cpu_ms_per_1000(n, fn)
        lines.append(f"| {name} | {per_1000:,.0f} | {per_1000 / 1000:.3f} ms |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


def dkimpy_version() -> str:
    from importlib.metadata import version

    return version("dkimpy")


if __name__ == "__main__":
    main()
