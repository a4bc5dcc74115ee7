"""config.example.toml lists every key with its default (the README says so)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from relay import config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def test_the_example_loads_and_is_the_defaults() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    loaded = config.from_mapping(raw)
    defaults = config.from_mapping({})
    for name in config.SECTIONS:
        if name == "store":  # the example leaves url empty: filled in from data_dir either way
            continue
        assert getattr(loaded, name) == getattr(defaults, name), name


def test_the_example_names_every_key() -> None:
    text = EXAMPLE.read_text()
    raw = tomllib.loads(text)
    missing = [
        f"{name}.{f.name}"
        for name, cls in config.SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.name not in raw.get(name, {})
    ]
    for array, cls in (("dkim", config.DkimConfig), ("webhooks", config.WebhookConfig)):
        block = text[text.index(f"# [[{array}]]") :]
        missing += [
            f"{array}.{f.name}" for f in dataclasses.fields(cls) if not re.search(rf"^# {f.name} *=", block, re.M)
        ]
    assert missing == []
