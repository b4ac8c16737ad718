"""Explanation vocabularies and per-event explanation labels.

Three labelling rules, each stated in the vocabulary it produces:

* :func:`history_matched_labels` (genres, item attributes): the event's label is the attribute of the item
  that the user's *earlier* events carried most often (ties: the attribute used by fewer items, i.e. the more
  specific one; then the lower id). Causal, so a label never leaks the future.
* :func:`tag_or_genre_labels` (MovieLens latest-small): the tags the user applied to that item, when they
  are in the vocabulary; otherwise the history-matched genre.
* :func:`mine_review_phrases` (review text): EXTRA-style phrase ids. Reviews are split into sentences,
  normalised, and 2-3 word phrases that start and end with a content word are counted; phrases whose
  stemmed content words are equal are one group (near-duplicates), and a group is kept when at least
  ``min_users`` distinct users wrote it. An event's labels are the kept phrases of its review, most
  specific (fewest users) first, at most ``max_labels``.

What may be *shown* for an item is narrower than the vocabulary: :func:`attested_explanations` lists, per
item, the explanation ids attested for it (its attributes that are in the vocabulary, and the labels of its
training events: tags applied to it, phrases written about it), so an explanation never names a genre, tag or
phrase the item does not have. In a deployment this table is catalogue data (item attributes, public tags or
reviews) that the bundle carries; the benchmarks build it from the training events only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from .log import ExplanationVocab, InteractionLog, Ragged


def history_matched_labels(
    log: InteractionLog, attributes: Ragged, names: Sequence[str], what: str
) -> InteractionLog:
    """Label each event with the item attribute that best matches the user's history so far."""
    items_per_attr = np.bincount(attributes.ids, minlength=len(names))
    attr_rows = [attributes.row(i).tolist() for i in range(len(attributes))]
    labels: list[list[int]] = []
    ptr = log.user_ptr
    item = log.item.tolist()
    for u in range(log.num_users):
        seen: Counter[int] = Counter()
        for e in range(ptr[u], ptr[u + 1]):
            attrs = attr_rows[item[e]]
            if attrs:
                best = max(attrs, key=lambda a: (seen[a], -items_per_attr[a], -a))
                labels.append([best])
                seen.update(attrs)
            else:
                labels.append([])
    rule = (
        f"{what}: the item's {what} seen most often in the user's earlier events "
        "(ties: the one used by fewer items, then lower id); one label per event"
    )
    return log.with_explanations(Ragged.from_lists(labels), ExplanationVocab(tuple(names), rule))


def normalise_tag(tag: str) -> str:
    """Case-fold and collapse whitespace, so 'Will Ferrell ' and 'will  ferrell' are one tag."""
    return " ".join(tag.lower().split())


def tag_or_genre_labels(
    log: InteractionLog,
    genres: Ragged,
    genre_names: Sequence[str],
    user_item_tags: dict[tuple[int, int], list[str]],
    min_pairs: int = 2,
) -> InteractionLog:
    """Vocabulary = genres + tags applied to at least ``min_pairs`` distinct (user, item) pairs.

    ``user_item_tags`` maps (dense user, dense item) to the raw tags that user applied to that item.
    """
    pairs_per_tag: Counter[str] = Counter()
    for tags in user_item_tags.values():
        pairs_per_tag.update({normalise_tag(t) for t in tags})
    kept = sorted(t for t, c in pairs_per_tag.items() if c >= min_pairs)
    texts = tuple(genre_names) + tuple(f"tag: {t}" for t in kept)
    tag_id = {t: len(genre_names) + i for i, t in enumerate(kept)}
    by_genre = history_matched_labels(log, genres, genre_names, "genre")
    labels: list[list[int]] = []
    users, items = log.user.tolist(), log.item.tolist()
    for e in range(log.num_events):
        raw = user_item_tags.get((users[e], items[e]), ())
        own = sorted({tag_id[n] for n in map(normalise_tag, raw) if n in tag_id})
        labels.append(own if own else by_genre.explanations.row(e).tolist())
    rule = (
        f"tags the user applied to the item (case-folded; tags on >= {min_pairs} user-item pairs: "
        f"{len(kept)}), else the item's genre seen most often in the user's earlier events"
    )
    return log.with_explanations(Ragged.from_lists(labels), ExplanationVocab(texts, rule))


_STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below
    between both but by can could did do does doing don down during each even few for from further get
    got had has have having he her here hers him his how i i'm if in into is it it's its itself just
    like me more most my no nor not now of off on once one only or other our out over own really same
    she should so some such than that the their them then there these they this those through to too
    under until up use used very was we well were what when where which while who why will with would
    you your it's i've i'd that's there's don't doesn't didn't can't won't isn't wasn't""".split()
)
_SENTENCE = re.compile(r"[.!?;:\n]+")
_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def review_phrases(text: str) -> set[tuple[str, ...]]:
    """Candidate 2-3 word phrases of a review: start and end with a content word, inside one sentence."""
    found: set[tuple[str, ...]] = set()
    for sentence in _SENTENCE.split(text.lower()):
        words = _NON_WORD.sub(" ", sentence).split()
        for n in (2, 3):
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if gram[0] in _STOPWORDS or gram[-1] in _STOPWORDS or any(w.isdigit() for w in gram):
                    continue
                found.add(tuple(gram))
    return found


def _group_key(phrase: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_stem(w) for w in phrase if w not in _STOPWORDS)


def mine_review_phrases(
    users: Sequence[object], texts: Sequence[str], min_users: int = 10, max_labels: int = 3
) -> tuple[ExplanationVocab, list[list[int]]]:
    """EXTRA-style explanation ids from review texts; returns the vocabulary and labels per review."""
    per_review: list[dict[tuple[str, ...], tuple[str, ...]]] = []
    users_of_group: dict[tuple[str, ...], set[object]] = defaultdict(set)
    surface: dict[tuple[str, ...], Counter[tuple[str, ...]]] = defaultdict(Counter)
    for user, text in zip(users, texts, strict=True):
        groups = {_group_key(p): p for p in review_phrases(text)}
        per_review.append(groups)
        for key, phrase in groups.items():
            users_of_group[key].add(user)
            surface[key][phrase] += 1
    kept = sorted(
        (k for k, us in users_of_group.items() if len(us) >= min_users),
        key=lambda k: (-len(users_of_group[k]), k),
    )
    group_id = {k: i for i, k in enumerate(kept)}
    vocab_texts = tuple(" ".join(surface[k].most_common(1)[0][0]) for k in kept)
    labels = []
    for groups in per_review:
        ids = sorted(
            (group_id[k] for k in groups if k in group_id), key=lambda i: (len(users_of_group[kept[i]]), i)
        )
        labels.append(ids[:max_labels])
    covered = sum(1 for x in labels if x)
    rule = (
        f"EXTRA-style review phrases: 2-3 word phrases inside one sentence, starting and ending with a content "
        f"word; near-duplicates (same stemmed content words) grouped; kept if written by >= {min_users} users "
        f"({len(kept)} kept); labels = up to {max_labels} kept phrases of the review, most specific first; "
        f"coverage {covered}/{len(labels)} reviews"
    )
    return ExplanationVocab(vocab_texts, rule), labels


def attested_explanations(log: InteractionLog, events: np.ndarray, width: int = 32) -> np.ndarray:
    """Per item, the explanation ids attested for it, most often first: ``(num_items, width)`` int64, padded
    with -1 (items with more keep their ``width`` most frequent).

    Attested: the labels of ``events`` (event indices, the training events) on the item, and the item's
    attributes whose name is a vocabulary text (genres); an attribute no event used ranks after every label
    that events used. Ties: lower id first."""
    num_vocab = len(log.vocab)
    labels = log.explanations.take(events)
    items = np.repeat(log.item[events], labels.lengths())
    keys = [items * num_vocab + labels.ids]
    meta, text_id = log.item_meta, {t: i for i, t in enumerate(log.vocab.texts)}
    if meta.attributes is not None and num_vocab:
        vocab_of_attr = np.array([text_id.get(n, -1) for n in meta.attribute_names], dtype=np.int64)
        attr_items = np.repeat(np.arange(len(meta.attributes)), meta.attributes.lengths())
        attr_ids = vocab_of_attr[meta.attributes.ids] if len(vocab_of_attr) else np.zeros(0, np.int64)
        keys.append(attr_items[attr_ids >= 0] * num_vocab + attr_ids[attr_ids >= 0])
    pairs, counts = np.unique(np.concatenate(keys).astype(np.int64), return_counts=True)
    label_counts = (
        np.bincount(np.searchsorted(pairs, keys[0]), minlength=len(pairs)) if len(pairs) else counts
    )
    item, expl = np.divmod(pairs, max(num_vocab, 1))
    order = np.lexsort((expl, -label_counts, item))  # by item, then most used, then id
    item, expl = item[order], expl[order]
    rank = np.arange(len(item)) - np.searchsorted(item, item)  # position within the item's list
    table = np.full((log.num_items, width), -1, dtype=np.int64)
    keep = rank < width
    table[item[keep], rank[keep]] = expl[keep]
    return table
