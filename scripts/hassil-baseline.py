#!/usr/bin/env python3
"""Baseline: Home Assistant's own template matcher (hassil) on our HA dev rows.

Setup (outside the repo, not a project dependency):
    python3 -m venv /tmp/hassil-venv
    /tmp/hassil-venv/bin/pip install hassil==3.0.1 home-assistant-intents==2026.12.1 pyyaml
Run:
    /tmp/hassil-venv/bin/python scripts/hassil-baseline.py --lang en \
        --rows /work/shared/datasets/ha_intents_en.jsonl \
        --fixtures /work/shared/datasets/ha_intents/fixtures_en.yaml [--json] [--mismatches]

Reports matched share, intent accuracy, slot micro-F1 over (slot, value) pairs,
and p50 latency of one recognise call. Data: home-assistant/intents, CC BY 4.0.
"""
import argparse
import json
import statistics
import sys
import time

import yaml
from hassil import Intents, TextSlotList, is_template, parse_sentence, recognize, recognize_best
from hassil import sample_expression
from hassil.models import MatchEntity
from home_assistant_intents import get_intents


def expand_names(name):
    """A fixture name may be a template ("[the] lamp"): expand it like HA's tests do."""
    if is_template(name):
        return [n.strip() for n in sample_expression(parse_sentence(name).expression)]
    return [name.strip()]


def slot_lists_from_fixtures(fx):
    """Mirror home-assistant/intents shared.get_slot_lists():
    area/floor: plain string lists (in == out == name);
    name: (in=name, out=name, context={"domain": <entity_id prefix>, **attributes})."""
    floors = [n for f in fx.get("floors", []) for n in expand_names(f["name"])]
    areas = [n for a in fx.get("areas", []) for n in expand_names(a["name"])]
    names = []
    for e in fx["entities"]:
        ctx = {"domain": e["id"].split(".", 1)[0], **e.get("attributes", {})}
        names.extend((n, n, ctx) for n in expand_names(e["name"]))
    return {
        "area": TextSlotList.from_strings(areas),
        "floor": TextSlotList.from_strings(floors),
        "name": TextSlotList.from_tuples(names),
    }


def norm(v):
    """Case-insensitive strings; numbers compared as numbers (50 == 50.0)."""
    if isinstance(v, bool):
        return str(v).casefold()
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v.strip().casefold()
    return v


def slot_ok(gold, ent, use_text):
    """HA tests compare entity.value to the expected slot; a list means 'any of'.
    With use_text, the entity's surface text (text_clean) also counts."""
    golds = gold if isinstance(gold, list) else [gold]
    golds = {norm(g) for g in golds}
    vals = ent.value if isinstance(ent.value, list) else [ent.value]
    if any(norm(v) in golds for v in vals):
        return True
    return use_text and norm(ent.text_clean) in golds


def f1(tp, n_pred, n_gold):
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lang", choices=["en", "de"], required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--json", action="store_true", help="one-line JSON summary")
    ap.add_argument("--best", action="store_true",
                    help="use recognize_best (default: recognize, as HA's sentence tests do)")
    ap.add_argument("--context-slots", action="store_true",
                    help="also count domain/device_class that hassil put in result.context "
                         "(from the matched {name}'s fixture context) as predicted slots")
    ap.add_argument("--mismatches", action="store_true", help="list rows that differ (stderr)")
    a = ap.parse_args()

    intents = Intents.from_dict(get_intents(a.lang))
    with open(a.fixtures, encoding="utf-8") as f:
        slot_lists = slot_lists_from_fixtures(yaml.safe_load(f))
    rows = [json.loads(l) for l in open(a.rows, encoding="utf-8") if l.strip()]
    rec = recognize_best if a.best else recognize

    matched = correct = 0
    n_gold = n_pred = tp = tp_text = 0
    times, bad = [], []
    for row in rows:
        t0 = time.perf_counter()
        # Row "context" (e.g. the satellite's area) is passed as HA's tests do.
        res = rec(row["text"], intents, slot_lists=slot_lists,
                  intent_context=row.get("context") or {})
        times.append(time.perf_counter() - t0)
        gold = row["slots"]
        n_gold += len(gold)
        if res is None:
            bad.append((row, None, {}))
            continue
        matched += 1
        correct += res.intent.name == row["intent"]
        ents = dict(res.entities)  # slot name -> MatchEntity (value, text)
        if a.context_slots:
            for k in ("domain", "device_class"):
                if k in res.context and k not in ents:
                    ents[k] = MatchEntity(name=k, value=res.context[k], text="")
        n_pred += len(ents)
        row_tp = sum(k in gold and slot_ok(gold[k], e, False) for k, e in ents.items())
        tp += row_tp
        tp_text += sum(k in gold and slot_ok(gold[k], e, True) for k, e in ents.items())
        if res.intent.name != row["intent"] or row_tp != len(gold) or len(ents) != len(gold):
            bad.append((row, res.intent.name, {k: (e.value, e.text_clean) for k, e in ents.items()}))

    n = len(rows)
    out = {
        "lang": a.lang, "rows": n, "recognizer": rec.__name__,
        "context_slots": a.context_slots,
        "matched": round(matched / n, 4), "intent_acc": round(correct / n, 4),
        "slot_f1": round(f1(tp, n_pred, n_gold), 4),
        "slot_f1_text_or_value": round(f1(tp_text, n_pred, n_gold), 4),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p90_ms": round(sorted(times)[int(0.9 * (n - 1))] * 1000, 2),
    }
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v}")
    if a.mismatches:
        for row, got, ents in bad:
            print(f"- {row['text']!r}: want {row['intent']} {row['slots']} | got {got} {ents}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
