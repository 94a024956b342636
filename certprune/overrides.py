"""Reading a config's layers: old key names, the recursive merge of YAML files and ``--set section.key=value``.

Kept apart from :mod:`certprune.config` (the types); what these produce is validated there, whole.
"""
from __future__ import annotations

import logging
from typing import Any

import yaml

log = logging.getLogger("certprune")
EVALUATION_SECTIONS = ("verify", "smoothing", "attack", "autoattack")
_RENAMED = {"methods": "prune_methods", "certify": "smoothing"}
_RENAMED_IN_SECTION = {"methods": "bound_methods", "max_examples": "max"}


class ConfigError(ValueError):
    """A configuration cannot be used; the message names the key and says why in one line."""


def renamed(data: Any, where: str) -> Any:
    """Old key names still load, with a warning: ``methods`` -> ``prune_methods``, ``certify`` -> ``smoothing``,
    a section's ``methods`` -> ``bound_methods`` and ``max_examples`` -> ``max``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in _RENAMED.items():
        if old in data:
            log.warning("config key %r is now %r (%s)", old, new, where)
            data[new] = data.pop(old)
    for section in EVALUATION_SECTIONS:
        if isinstance(data.get(section), dict):
            inner = dict(data[section])
            for old, new in _RENAMED_IN_SECTION.items():
                if old in inner:
                    log.warning("config key %s.%s is now %s.%s (%s)", section, old, section, new, where)
                    inner[new] = inner.pop(old)
            data[section] = inner
    if "report_note" in data:
        log.warning("config key 'report_note' is ignored (%s): results.md now states every setting itself", where)
        data.pop("report_note")
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive update; a mapping that names a different ``name`` (another loss) replaces the old one whole."""
    if "name" in update and update["name"] != base.get("name"):
        return dict(update)
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both else value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"prune.epochs=5"`` -> ``{"prune": {"epochs": 5}}``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value
