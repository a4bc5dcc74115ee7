"""schemathesis against /api/openapi.json of a running `relay serve`: no server errors, and
status codes, content types and response bodies as the schema documents them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiosmtplib
from helpers import NOWHERE, ServeProcess, serve_config

TOKEN = "schemathesis-token-0123456789"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")


async def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    cfg = serve_config(
        tmp_path,
        f"""[http]
listen = "127.0.0.1:0"
api_tokens = ["{TOKEN}"]
{NOWHERE}""",
    )
    server = await ServeProcess(cfg).start()
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, start_tls=False)
        await client.connect()
        await client.sendmail("a@example.com", ["b@example.net"], b"Subject: x\r\nX-Relay-Tag: t1\r\n\r\nhi\r\n")
        await client.quit()
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"), "run",
            f"http://127.0.0.1:{server.ports['http']}/api/openapi.json",
            "-H", f"Authorization: Bearer {TOKEN}",
            "--checks", ",".join(CHECKS),
            "--max-time", "20", "--seed", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()[-4000:]
    finally:
        server.terminate()
        assert await server.wait() == 0
    assert not [line for line in server.log if "Traceback" in line or " ERROR " in line]
