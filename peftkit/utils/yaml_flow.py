"""One line of YAML for the maps and lists that error messages suggest writing into a recipe."""

from __future__ import annotations

from typing import Any

import yaml


def flow_yaml(value: Any) -> str:
    """`value` (a mapping, a list or a scalar) as one line of YAML flow style, quoted where YAML needs it:
    `{method: lora}`, `[a.jsonl, b.jsonl]`, `{roles: {'[Customer]': user, '@bot': assistant}}`. What it writes
    reads back as `value` with `yaml.safe_load`; keys keep their order, text its own letters."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False, allow_unicode=True
                          ).removesuffix("\n...\n").strip()
