"""Loaders for the three MovieLens datasets."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import DataFormatError
from .explanations import history_matched_labels, tag_or_genre_labels
from .log import InteractionLog, ItemMeta, Ragged
from .lrurec import load_lrurec_pickle
from .readers import parse_int, parse_timestamp, read_csv_records, read_text_lines


def _genre_meta(
    item_ids: np.ndarray, titles: dict[int, str], genres: dict[int, list[str]], path: Path
) -> tuple[ItemMeta, list[str]]:
    missing = [int(i) for i in item_ids if int(i) not in titles]
    if missing:
        raise DataFormatError(path, f"{len(missing)} rated items have no metadata, e.g. {missing[:5]}")
    names = sorted({g for i in item_ids for g in genres[int(i)]})
    gid = {g: k for k, g in enumerate(names)}
    attrs = Ragged.from_lists([[gid[g] for g in genres[int(i)]] for i in item_ids])
    meta = ItemMeta(tuple(titles[int(i)] for i in item_ids), tuple(names), attrs)
    return meta, names


def load_movielens_latest_small(folder: Path) -> InteractionLog:
    """ml-latest-small: ratings with unix seconds; tag/genre explanations (tags the user applied win)."""
    ratings = folder / "ratings.csv"
    users, items, times = [], [], []
    for line, row in read_csv_records(ratings, ("userId", "movieId", "timestamp")):
        users.append(parse_int(row["userId"], ratings, line, "userId"))
        items.append(parse_int(row["movieId"], ratings, line, "movieId"))
        times.append(parse_timestamp(row["timestamp"], ratings, line))
    movies = folder / "movies.csv"
    titles, genres = {}, {}
    for line, row in read_csv_records(movies, ("movieId", "title", "genres")):
        mid = parse_int(row["movieId"], movies, line, "movieId")
        titles[mid] = row["title"]
        genres[mid] = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
    item_ids = np.unique(np.asarray(items, dtype=np.int64))
    meta, names = _genre_meta(item_ids, titles, genres, movies)
    log = InteractionLog.from_events(
        "movielens-latest-small", users, items, times, "seconds", item_universe=item_ids, item_meta=meta
    )
    tags_file = folder / "tags.csv"
    user_index = {int(u): k for k, u in enumerate(log.user_ids)}
    item_index = {int(i): k for k, i in enumerate(log.item_ids)}
    tags: dict[tuple[int, int], list[str]] = defaultdict(list)
    for line, row in read_csv_records(tags_file, ("userId", "movieId", "tag")):
        u = parse_int(row["userId"], tags_file, line, "userId")
        m = parse_int(row["movieId"], tags_file, line, "movieId")
        if u in user_index and m in item_index:
            tags[(user_index[u], item_index[m])].append(row["tag"])
    return tag_or_genre_labels(log, meta.attributes, names, tags)


def load_movielens_100k(folder: Path) -> InteractionLog:
    """ml-100k: u.data (tab-separated, unix seconds), u.item genres (latin-1); genre explanations."""
    data = folder / "u.data"
    users, items, times = [], [], []
    for line, text in enumerate(read_text_lines(data), start=1):
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) != 4:
            raise DataFormatError(data, f"expected 4 tab-separated fields, found {len(parts)}", line=line)
        users.append(parse_int(parts[0], data, line, "user id"))
        items.append(parse_int(parts[1], data, line, "item id"))
        times.append(parse_timestamp(parts[3], data, line))
    genre_file = folder / "u.genre"
    genre_names = [t.split("|")[0] for t in read_text_lines(genre_file) if t.strip()]
    item_file = folder / "u.item"
    titles, genres = {}, {}
    for line, text in enumerate(read_text_lines(item_file), start=1):
        if not text.strip():
            continue
        parts = text.split("|")
        if len(parts) != 5 + len(genre_names):
            raise DataFormatError(
                item_file, f"expected {5 + len(genre_names)} fields, found {len(parts)}", line=line
            )
        mid = parse_int(parts[0], item_file, line, "movie id")
        titles[mid] = parts[1]
        genres[mid] = [g for g, flag in zip(genre_names, parts[5:], strict=True) if flag.strip() == "1"]
    item_ids = np.unique(np.asarray(items, dtype=np.int64))
    meta, names = _genre_meta(item_ids, titles, genres, item_file)
    log = InteractionLog.from_events(
        "movielens-100k", users, items, times, "seconds", item_universe=item_ids, item_meta=meta
    )
    return history_matched_labels(log, meta.attributes, names, "genre")


def load_movielens_1m_lrurec(folder: Path) -> InteractionLog:
    """LRURec's ML-1M pickle (order only) joined with movies.dat genres through ``smap``."""
    movies = folder / "movies.dat"
    titles, genres = {}, {}
    for line, text in enumerate(read_text_lines(movies), start=1):
        if not text.strip():
            continue
        parts = text.split("::")
        if len(parts) != 3:
            raise DataFormatError(
                movies, f"expected MovieID::Title::Genres, found {len(parts)} fields", line=line
            )
        mid = parse_int(parts[0], movies, line, "MovieID")
        titles[mid] = parts[1]
        genres[mid] = [g for g in parts[2].split("|") if g]
    log = load_lrurec_pickle(folder / "dataset.pkl", "movielens-1m-lrurec")
    meta, names = _genre_meta(log.item_ids, titles, genres, movies)
    return history_matched_labels(replace(log, item_meta=meta), meta.attributes, names, "genre")
