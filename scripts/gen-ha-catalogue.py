#!/usr/bin/env python3
"""Writes configs/examples/ha-catalogue-en.jsonl from the Home Assistant
intent catalogue (intents.yaml): one row per example sentence of each
supported intent's slot combinations, without slot values. Prints, for
configs/smart-home.toml, each intent with the catalogue slots that the
pack's schema has.

usage: scripts/gen-ha-catalogue.py ../shared/datasets/ha_intents/intents.yaml
"""
import json
import sys

import yaml

SCHEMA = {"name", "area", "floor", "domain", "device_class", "state", "brightness",
          "color", "temperature", "position", "volume_level", "search_query",
          "media_class", "item", "minutes", "hours", "seconds", "start_hours",
          "conversation_command"}


def main(path):
    catalogue = yaml.safe_load(open(path))
    rows, labels = [], []
    for intent, spec in catalogue.items():
        if not spec.get("supported"):
            continue
        slots = sorted(set(spec.get("slots") or {}) & SCHEMA)
        labels.append((intent, slots))
        for combo in (spec.get("slot_combinations") or {}).values():
            examples = combo.get("example") or []
            for text in [examples] if isinstance(examples, str) else examples:
                rows.append({"text": text, "intent": intent})
    with open("configs/examples/ha-catalogue-en.jsonl", "w") as out:
        for r in rows:
            out.write(json.dumps(r) + "\n")
    for intent, slots in labels:
        print(f'  {{ name = "{intent}", slots = {json.dumps(slots)} }},')
    print(f"{len(rows)} rows, {len(labels)} intents", file=sys.stderr)


main(sys.argv[1])
