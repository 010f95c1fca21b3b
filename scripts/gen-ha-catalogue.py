#!/usr/bin/env python3
"""Writes configs/examples/ha-catalogue-en.jsonl from the Home Assistant
intent catalogue (intents.yaml): one row per example sentence of each
supported intent's slot combinations, without slot values. Prints, for
configs/smart-home.toml, each intent with its description and the slots it may fill: the
catalogue's slots that the pack's schema has, and those its annotated
sentences (configs/examples/ha-intents-en.jsonl) fill.

usage: scripts/gen-ha-catalogue.py ../shared/datasets/ha_intents/intents.yaml
"""
import json
import sys

import yaml

# The pack's slots, in schema order.
SCHEMA = ["domain", "device_class", "name", "state", "area", "brightness", "color",
          "search_query", "media_class", "floor", "temperature", "position", "minutes",
          "start_hours", "hours", "seconds", "conversation_command", "volume_level", "item"]


def main(path):
    catalogue = yaml.safe_load(open(path))
    annotated = [json.loads(line) for line in open("configs/examples/ha-intents-en.jsonl")]
    rows, labels = [], []
    for intent, spec in catalogue.items():
        if not spec.get("supported"):
            continue
        names = set(spec.get("slots") or {})
        for r in annotated:
            if r["intent"] == intent:
                names |= set(r.get("slots") or {})
        labels.append((intent, spec.get("description"), [s for s in SCHEMA if s in names]))
        for combo in (spec.get("slot_combinations") or {}).values():
            examples = combo.get("example") or []
            for text in [examples] if isinstance(examples, str) else examples:
                rows.append({"text": text, "intent": intent})
    with open("configs/examples/ha-catalogue-en.jsonl", "w") as out:
        for r in rows:
            out.write(json.dumps(r) + "\n")
    for intent, description, slots in labels:
        print(f'  {{ name = "{intent}", description = {json.dumps(description)}, '
              f'slots = {json.dumps(slots)} }},')
    print(f"{len(rows)} rows, {len(labels)} intents", file=sys.stderr)


main(sys.argv[1])
