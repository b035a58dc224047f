"""Checks shared by the OpenMoji and Noto Emoji build tests: both write the same imagefolder layout."""

import json
import os


def metadata_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def split_by_concept(rows: list[dict]) -> tuple[set, list[dict], list[dict]]:
    """Assert the split is by concept (unseen concepts never trained, seen-variants of trained concepts, both in
    val); returns (train concepts, unseen rows, seen-variant rows)."""
    train_concepts = {r["concept"] for r in rows if r["split"] == "train"}
    unseen = [r for r in rows if r["subset"] == "unseen"]
    variants = [r for r in rows if r["subset"] == "seen-variant"]
    assert unseen and variants
    assert all(r["split"] == "val" and r["concept"] not in train_concepts for r in unseen)
    assert all(r["split"] == "val" and r["concept"] in train_concepts for r in variants)
    return train_concepts, unseen, variants
