"""Loaders for the Amazon 5-core datasets that carry time and an explanation signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DataFormatError
from .explanations import history_matched_labels, mine_review_phrases
from .log import InteractionLog, ItemMeta, Ragged
from .readers import parse_int, read_json, read_text_lines


def _int_lines(path: Path) -> list[list[int]]:
    rows = []
    for line, text in enumerate(read_text_lines(path), start=1):
        if text.strip():
            rows.append([parse_int(x, path, line, "id") for x in text.split()])
    return rows


def load_amazon_beauty_5core(folder: Path) -> InteractionLog:
    """S3Rec's Beauty sequences, joined with TiCoSeRec's day timestamps and named attributes.

    As PROVENANCE.md shows, TiCoSeRec line *i* is S3Rec line *i* and both are in time order, so the
    timestamp of an S3Rec event is the TiCoSeRec timestamp at the same position (checked: user ids and
    lengths must agree line by line). Attribute names come from the P5 datamaps (``attributeid2num >= 5``
    in ascending id order is S3Rec attribute 1, 2, ...). Explanations: history-matched attribute.
    """
    seq_file = folder / "s3rec" / "Beauty.txt"
    time_file = folder / "ticoserec" / "Beauty_time_org_rank.txt"
    seqs, stamps = _int_lines(seq_file), _int_lines(time_file)
    if len(seqs) != len(stamps):
        raise DataFormatError(time_file, f"{len(stamps)} users but {seq_file.name} has {len(seqs)}")
    users, items, times = [], [], []
    for line, (seq, ts) in enumerate(zip(seqs, stamps, strict=True), start=1):
        if seq[0] != ts[0] or len(seq) != len(ts):
            raise DataFormatError(time_file, f"user {ts[0]} does not line up with {seq_file.name}", line=line)
        users += [seq[0]] * (len(seq) - 1)
        items += seq[1:]
        times += ts[1:]
    maps = read_json(folder / "p5-datamaps" / "datamaps.json")
    attr_file = folder / "s3rec" / "Beauty_item2attributes.json"
    item_attrs = read_json(attr_file)
    try:
        kept = sorted((int(a) for a, n in maps["attributeid2num"].items() if n >= 5))
        names = [maps["id2attribute"][str(a)] for a in kept]
        asin = maps["id2item"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(
            folder / "p5-datamaps" / "datamaps.json", f"unexpected structure ({exc})"
        ) from None
    item_ids = np.unique(np.asarray(items, dtype=np.int64))
    rows = []
    for i in item_ids:
        attrs = item_attrs.get(str(i), [])
        if any(not isinstance(a, int) or not 1 <= a <= len(names) for a in attrs):
            raise DataFormatError(attr_file, f"item {i}: attribute ids outside 1..{len(names)}")
        rows.append([a - 1 for a in attrs])
    meta = ItemMeta(tuple(asin.get(str(i), str(i)) for i in item_ids), tuple(names), Ragged.from_lists(rows))
    log = InteractionLog.from_events(
        "amazon-beauty-5core", users, items, times, "days", item_universe=item_ids, item_meta=meta
    )
    return history_matched_labels(log, meta.attributes, names, "attribute")


def load_amazon_musical_instruments(folder: Path) -> InteractionLog:
    """McAuley's Musical Instruments 5-core reviews; EXTRA-style review-phrase explanations."""
    path = folder / "reviews_Musical_Instruments_5.json.gz"
    users, items, times, texts = [], [], [], []
    for line, text in enumerate(read_text_lines(path), start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
            users.append(str(rec["reviewerID"]))
            items.append(str(rec["asin"]))
            ts = int(rec["unixReviewTime"])
            texts.append(f"{rec.get('summary') or ''}. {rec.get('reviewText') or ''}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(path, f"bad review record ({exc})", line=line) from None
        if ts < 0:
            raise DataFormatError(path, f"negative unixReviewTime {ts}", line=line)
        times.append(ts)
    vocab, labels = mine_review_phrases(users, texts)
    return InteractionLog.from_events(
        "amazon-musical-instruments-5core", users, items, times, "days", Ragged.from_lists(labels), vocab
    )
