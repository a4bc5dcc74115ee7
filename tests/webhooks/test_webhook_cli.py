"""`relay webhooks secret|list|test|replay|enable` as a user runs them, against a store on
disk and a receiver on loopback."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

from helpers import relay_cli, write_config
from standardwebhooks import Webhook
from ulid import ULID
from webhook_fixtures import endpoints, message, opened
from webhook_receiver import Reply, new_secret, receiver


async def test_secret_is_32_random_bytes() -> None:
    code, out, _ = await relay_cli("webhooks", "secret")
    assert code == 0
    secret = out.strip()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    Webhook(secret)  # the reference library takes it


async def test_list_test_replay_enable(tmp_path: Path) -> None:
    secret = new_secret()
    async with receiver([secret], lambda req: Reply(410 if req.path == "/gone" else 200)) as r:
        db = tmp_path / "relay.db"
        config = write_config(tmp_path / "relay.toml", f"""
[server]
data_dir = "{tmp_path}"
[store]
url = "sqlite+aiosqlite:///{db}"
[[webhooks]]
url = "{r.url()}"
secret = "{secret}"
[[webhooks]]
url = "{r.url("/gone")}"
secret = "{secret}"
events = ["message.delivered"]
""")  # fmt: skip
        assert (await relay_cli("--config", str(config), "db", "upgrade"))[0] == 0

        # A signed test event, now; the status printed.
        code, out, err = await relay_cli("--config", str(config), "webhooks", "test", r.url())
        assert code == 0, err
        assert re.fullmatch(r"msg_[0-9A-Z]{26}: 200\n", out)
        (req,) = r.requests
        assert req.verified == [True]
        assert req.payload["type"] == "webhook.test"
        code, out, _ = await relay_cli("--config", str(config), "webhooks", "test", r.url("/gone"))
        assert (code, out.split(": ", 1)[1]) == (1, "HTTP 410\n")

        hooks = endpoints({"url": r.url(), "secret": secret},
                          {"url": r.url("/gone"), "secret": secret, "events": ["message.delivered"]})  # fmt: skip
        start = time.time()
        async with opened(f"sqlite+aiosqlite:///{db}", hooks) as store:
            await store.enqueue(message(str(ULID())))
        code, out, _ = await relay_cli("--config", str(config), "webhooks", "list")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].startswith(f"{r.url()}  pending 1  failed 0  delivered 0  enabled")
        assert lines[1].startswith(f"{r.url('/gone')}  pending 0")

        code, out, _ = await relay_cli("--config", str(config), "webhooks", "replay", "--since", str(start - 1))
        assert (code, out) == (0, "queued 1 webhook deliveries\n")
        code, _, err = await relay_cli("--config", str(config), "webhooks", "replay", "--since", "2099-01-01",
                                       "--until", "2000-01-01")  # fmt: skip
        assert code == 2
        assert "--since" in err

        code, out, _ = await relay_cli("--config", str(config), "webhooks", "enable", r.url("/gone"))
        assert (code, out) == (0, f"{r.url('/gone')} was not disabled\n")
