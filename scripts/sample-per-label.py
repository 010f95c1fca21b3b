#!/usr/bin/env python3
"""Writes a seeded sample of N rows per intent of a labelled JSONL file (text,
intent, slots kept), for evaluations that would take too long on the whole
file.

usage: scripts/sample-per-label.py IN.jsonl N SEED > OUT.jsonl
"""
import collections
import json
import random
import sys


def main(path, n, seed):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    by_intent = collections.defaultdict(list)
    for r in rows:
        by_intent[r["intent"]].append(r)
    rng = random.Random(seed)
    for intent in sorted(by_intent):
        group = by_intent[intent]
        rng.shuffle(group)
        for r in group[:n]:
            row = {"text": r["text"], "intent": r["intent"], "slots": r.get("slots")}
            print(json.dumps(row, ensure_ascii=False))


main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
