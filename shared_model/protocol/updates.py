"""The shared-update codec both sides speak (pure numpy, no Flower): dense arrays, or row-sparse item tables,
optionally int8-compressed.

A sparse update sends, for each item table (``item_emb.weight``, ``item_bias``), only the rows the device
touched (plus optional random decoy rows) as ``<name>@rows`` (int32 row ids) and ``<name>@values``; every
other shared array goes dense. The server densifies a sparse update against the arrays it sent. A device in
sparse mode trains only those rows of the item tables (the other rows' gradients are masked), so what it
uploads is exactly what it trained; the decoy rows then carry real updates (sampled negatives), weighted by
the inverse of their sampling chance (:func:`decoy_chances`) so that the server's mean estimates what dense
training does to every row the devices did not touch.

A sparse update may also sample the other shared matrices (:func:`sample_rows`): a random share of each one's
rows (a row: a vector along the last axis) as ``<name>@rows`` and ``<name>@values`` (2-D), each row's change
divided by that share, so that the server's mean is an unbiased estimate of the dense change.

With importance sampling (:func:`importance_update`) the device trains densely and then draws the rows to send
with chances proportional to the size of their change (the touched item rows for certain), each drawn row's
change divided by its chance: the same unbiased estimate with less variance for the same expected size. By
default each other matrix sends about ``row_fraction`` of its rows; with a balanced row budget
(:func:`balanced_budgets`) the matrices share those bytes so that the sum of their relative variances is least
(a small matrix whose change spreads over all its rows sends more of them, one whose change sits in a few rows
fewer).
With error feedback (:func:`largest_rows_update`) it sends the rows whose change is largest, unscaled, and keeps
what it left out (:func:`unsent_change`) to add to its next change: biased in one round, nothing lost over
rounds.

With output states (``sparse_sampling="states"``) the device sends its touched item rows exactly and, instead of
any other item row, what the server needs to compute every other row's change itself: the interests its one
local SGD step scored the full softmax with (``STATES``: per position, each head's coordinates and log-prior),
how many positions each of its users trained (``STATE_COUNTS``) and each user's share of its reply
(``STATE_SHARES``). An untouched item's row changes only through the softmax's log-partition, which those
states determine (:mod:`shared_model.softmax_change`), so the server's item tables are the dense update's, for
a few KB.

Compression replaces every float array ``k`` of an update by the change from what the server sent, quantized
per row with stochastic rounding so that the decoded update is unbiased (FedAvg averages the rounding noise
away): ``int8`` as ``k@q8`` (int8, levels -127..127), ``int4`` as ``k@q4`` (levels -7..7, two per byte: uint8,
the flattened array's even elements in the low nibbles), each with ``k@scale`` (float32, one scale per
leading-axis row, or one per 1-D array). ``int4`` quantizes the matrices only: a vector (a bias, a norm's gain,
the touched items' biases) has one scale for all its values, and its changes are heavy-tailed (the largest 6x
their RMS for the item bias, 15x for the explanation bias), which left int4's rounding noise as large as the
signal; vectors go as ``@q8`` (a few hundred bytes). Decoding needs the arrays the server sent, which it has.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

ITEM_TABLES = ("item_emb.weight", "item_bias")
ROWS, VALUES = "@rows", "@values"
ROW_IDS = np.int32  # the dtype of row ids
STATES, STATE_COUNTS, STATE_SHARES = "softmax@states", "softmax@counts", "softmax@shares"
STATE_KEYS = (STATES, STATE_COUNTS, STATE_SHARES)
Q8, Q4, SCALE = "@q8", "@q4", "@scale"
QUANTIZED = {"int8": Q8, "int4": Q4}  # compression -> the suffix of its quantized matrices
LEVELS = {Q8: 127, Q4: 7}  # the largest quantized magnitude of each
SAMPLED_MIN_ROWS = 16  # a matrix with fewer rows goes whole (sampling a few rows would be mostly noise)


def update_weight(events: int, max_len: int, local_epochs: int) -> int:
    """A user's example weight in a round: the next-item targets it trains, one window of at most ``max_len``
    targets per local epoch from its ``events`` training events (a centralized batch weighs users the same
    way; weighting by all events let a few heavy users dominate a cohort)."""
    return local_epochs * max(min(events - 1, max_len), 0)


def max_update_weight(max_len: int, local_epochs: int, num_users: int, num_nodes: int) -> int:
    """The largest example weight an honest node replies: its users (at most ``ceil(num_users / num_nodes)``,
    the partition's size) each at the largest :func:`update_weight`. The server rejects a larger claim."""
    return local_epochs * max_len * -(-num_users // max(num_nodes, 1))


def upload_rows(touched: np.ndarray, decoys: int, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The item rows a sparse update carries: the touched rows plus ``decoys`` random other rows (sorted)."""
    rows = np.unique(np.asarray(touched, dtype=ROW_IDS))
    if decoys:
        free = np.setdiff1d(np.arange(num_rows), rows)
        rows = np.union1d(rows, rng.choice(free, size=min(decoys, len(free)), replace=False))
    return rows.astype(ROW_IDS)


def decoy_chances(touched: np.ndarray, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """The chance that :func:`upload_rows` drew each of ``rows``: 1 for a touched row, for a decoy the number of
    decoys over the number of untouched rows. Dividing each decoy's change by it makes the server's mean over
    devices estimate, without bias, the small change dense training gives every untouched row (the full
    softmax's push-down), which a sparse update otherwise drops."""
    touched = np.unique(np.asarray(touched, dtype=np.int64))
    decoy = ~np.isin(rows, touched)
    chance = np.ones(len(rows))
    chance[decoy] = decoy.sum() / (num_rows - len(touched))
    return chance


def encode_rows(arrays: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-sparse form of ``arrays``: each array named in ``rows`` keeps only those of its rows (:func:`rows_of`)."""
    out = {k: v for k, v in arrays.items() if k not in rows}
    for name, r in rows.items():
        out[name + ROWS] = np.asarray(r, ROW_IDS)
        out[name + VALUES] = rows_of(arrays[name])[r]
    return out


def encode_sparse(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Row-sparse form of ``arrays``: the item tables keep only ``rows`` (see :func:`upload_rows`)."""
    return encode_rows(arrays, dict.fromkeys(ITEM_TABLES, rows))


def sent_rows(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows each row-sparse array of ``update`` carries, by array name."""
    return {k.removesuffix(ROWS): v for k, v in update.items() if k.endswith(ROWS)}


def sparse_update(
    update: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    touched: np.ndarray,
    rows: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """What a sparse device sends: the item tables at ``rows`` (``touched`` plus decoys, each row's change
    divided by its :func:`decoy_chances`) and, when ``fraction`` < 1, a sample of every other matrix's rows
    (:func:`sample_rows`)."""
    chance = decoy_chances(touched, rows, len(sent[ITEM_TABLES[0]]))
    out = _replace_rows(update, _weighted_rows(update, sent, list(ITEM_TABLES), rows, chance))
    return sample_rows(out, sent, fraction, rng) if fraction < 1 else out


def poisson_sample(
    weights: np.ndarray, budget: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn independently, row ``i`` with chance ``min(1, c * weights[i])`` (an infinite weight: always),
    ``c`` chosen so that the chances sum to ``budget`` (every row of positive weight when there are no more
    than that); rows of weight 0 are never drawn. Returns the drawn rows (sorted) and their chances. Chances
    proportional to each row's change norm give the unbiased estimate (change / chance) of least variance for an
    expected number of rows."""
    w = np.asarray(weights, np.float64)
    chance = np.zeros(len(w))
    positive = np.flatnonzero(w > 0)
    if len(positive) <= budget:
        chance[positive] = 1.0
    else:
        order = positive[np.argsort(-w[positive], kind="stable")]  # largest first
        sorted_w = w[order]
        always = int(np.isinf(sorted_w).sum())
        finite = np.where(np.isinf(sorted_w), 0.0, sorted_w)
        rest = np.cumsum(finite[::-1])[::-1]  # rest[k]: the weight of the rows after the k largest
        k = np.arange(len(order))
        with np.errstate(divide="ignore", invalid="ignore"):
            c = (budget - k) / rest
            fits = (k >= always) & (budget - k > 0) & (c * sorted_w <= 1)
        chance[order[:always]] = 1.0
        if fits.any():  # the k largest rows saturate, the others get c times their weight
            first = int(np.argmax(fits))
            chance[order[:first]] = 1.0
            chance[order[first:]] = c[first] * sorted_w[first:]
    rows = np.flatnonzero(rng.random(len(w)) < chance)
    return rows.astype(ROW_IDS), chance[rows]


def _weighted_rows(
    update: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    names: list[str],
    rows: np.ndarray,
    chance: np.ndarray,
) -> dict[str, np.ndarray]:
    """``<name>@rows`` and ``<name>@values`` of each array of ``names`` at ``rows``: the sent values plus the
    change divided by each row's chance."""
    out = {}
    for name in names:
        base, new = rows_of(sent[name]), rows_of(update[name])
        scale = (1.0 / chance).reshape(-1, *(1,) * (base.ndim - 1))
        out[name + ROWS] = rows
        out[name + VALUES] = (base[rows] + scale * (new[rows] - base[rows])).astype(base.dtype)
    return out


def row_bytes(width: int, compress: str) -> float:
    """Upload bytes of one sampled row of ``width`` values under ``compress``: its values, its int32 id and,
    when quantized, its float32 scale."""
    value = {"none": 4.0, "int8": 1.0, "int4": 0.5}[compress]
    return width * value + np.dtype(ROW_IDS).itemsize + (0 if compress == "none" else 4)


def balanced_budgets(
    norms: dict[str, np.ndarray], fraction: float, cost: dict[str, float]
) -> dict[str, float]:
    """Expected rows to draw from each matrix (row change norms ``norms``, ``cost`` bytes a row) so that the
    expected bytes are those of ``fraction`` of every matrix's rows and the sum over matrices of the relative
    variance of their importance-sampled estimate (variance / squared norm of the change) is least.

    Drawing ``b`` rows by norm leaves a variance of about ``S**2 / b - E`` (``S``: the sum of the row norms,
    ``E``: of their squares), so the optimum is ``b_a = mu * S_a / sqrt(cost_a * E_a)`` (Lagrange), ``mu``
    spending the bytes; a matrix whose share reaches all its changed rows gets them all and the rest is shared
    again among the others. A matrix that did not change gets 0."""
    total = fraction * sum(cost[a] * len(n) for a, n in norms.items())
    changed = {a: int((n > 0).sum()) for a, n in norms.items()}
    budgets = {a: 0.0 for a in norms if not changed[a]}
    raw = {
        a: float(n.sum()) / math.sqrt(cost[a] * float((n**2).sum())) for a, n in norms.items() if changed[a]
    }
    while raw:
        left = total - sum(cost[a] * b for a, b in budgets.items())
        mu = max(left, 0.0) / sum(cost[a] * r for a, r in raw.items())
        full = [a for a, r in raw.items() if mu * r >= changed[a]]
        if not full:
            return budgets | {a: mu * r for a, r in raw.items()}
        for a in full:
            budgets[a] = float(changed[a])
            del raw[a]
    return budgets


def importance_update(
    update: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    touched: np.ndarray,
    decoys: int,
    fraction: float,
    rng: np.random.Generator,
    balanced_for: str | None = None,
) -> dict[str, np.ndarray]:
    """What a sparse device sends with importance sampling (``sparse_sampling="importance"``), after dense local
    training: the item tables' ``touched`` rows for certain and about ``decoys`` other rows, and, when
    ``fraction`` < 1, about that share of every other matrix's rows; each row drawn with a chance proportional to
    the norm of its change (:func:`poisson_sample`) and its change divided by that chance. Unbiased like
    :func:`sparse_update`, with less variance for the same expected size: the rows that changed most (the items
    the softmax pushed hardest, the explanation ids the user used) are sent, the ones that barely moved rarely.
    With ``balanced_for`` (the upload's compression, under ``row_budget="balanced"``) the other matrices share the
    bytes of ``fraction`` of their rows by :func:`balanced_budgets` instead of each sending that share of its own."""
    choose = partial(poisson_sample, rng=rng)
    return _rows_by_change(update, sent, touched, decoys, fraction, choose, balanced_for)


def largest_rows_update(
    update: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    touched: np.ndarray,
    decoys: int,
    fraction: float,
) -> dict[str, np.ndarray]:
    """What a sparse device sends with error feedback (``sparse_sampling="error-feedback"``), after dense local
    training: the item tables' ``touched`` rows and the ``decoys`` other rows whose change is largest, and, when
    ``fraction`` < 1, that share of every other matrix's rows, those whose change is largest; each row as it is
    (the same expected size as :func:`importance_update`, no rescaling). The choice is biased on its own; the
    device corrects it by adding what it did not send to its next change (:func:`unsent_change`)."""
    return _rows_by_change(update, sent, touched, decoys, fraction, _largest)


def unsent_change(
    update: dict[str, np.ndarray], sent: dict[str, np.ndarray], upload: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Error feedback's residual: the part of ``update``'s change from ``sent`` that the row-sparse ``upload``
    left out (float32, only the arrays it sampled), which the device adds to its next change."""
    sent_values = densify(upload, sent)
    return {
        name: (update[name].astype(np.float64) - sent_values[name]).astype(np.float32)
        for name in sent_rows(upload)
    }


def _row_norms(update: dict[str, np.ndarray], sent: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The norm of each row's change (:func:`rows_of`) of array ``name`` from ``sent`` to ``update``."""
    change = rows_of(update[name]).astype(np.float64) - rows_of(sent[name])
    return np.sqrt((change.reshape(len(change), -1) ** 2).sum(axis=1))


def _rows_by_change(
    update: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    touched: np.ndarray,
    decoys: int,
    fraction: float,
    choose: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]],
    balanced_for: str | None = None,
) -> dict[str, np.ndarray]:
    """``update`` with the item tables and (``fraction`` < 1) every sampled matrix reduced to the rows that
    ``choose(change norms, expected rows)`` returns with their chances: the item tables' ``touched`` rows
    always (infinite norm) plus about ``decoys``, each other matrix about ``fraction`` of its rows (with
    ``balanced_for``, a compression: the matrices' :func:`balanced_budgets` of the same bytes)."""
    item_norms = np.sqrt(sum(_row_norms(update, sent, name) ** 2 for name in ITEM_TABLES))
    certain = np.unique(np.asarray(touched, dtype=np.int64))
    item_norms[certain] = np.inf
    out = _weighted_rows(update, sent, list(ITEM_TABLES), *choose(item_norms, len(certain) + decoys))
    names = sampled_names(sent) if fraction < 1 else []
    norms = {name: _row_norms(update, sent, name) for name in names}
    if balanced_for is None:
        budgets = {name: fraction * len(n) for name, n in norms.items()}
    else:
        cost = {name: row_bytes(rows_of(sent[name]).shape[-1], balanced_for) for name in names}
        budgets = balanced_budgets(norms, fraction, cost)
    for name in names:
        out |= _weighted_rows(update, sent, [name], *choose(norms[name], budgets[name]))
    return _replace_rows(update, out)


def _largest(norms: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``round(budget)`` (at least one) rows of largest norm (sorted row ids; never a row that did not
    change) and their chance (1: sent for certain)."""
    order = np.argsort(-norms, kind="stable")[: max(1, round(budget))]
    rows = np.sort(order[norms[order] > 0]).astype(ROW_IDS)
    return rows, np.ones(len(rows))


def _replace_rows(update: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``update`` with each array that ``rows`` carries as ``@rows``/``@values`` replaced by them."""
    sampled = {k.removesuffix(ROWS) for k in rows if k.endswith(ROWS)}
    return {k: v for k, v in update.items() if k not in sampled} | rows


def rows_of(array: np.ndarray) -> np.ndarray:
    """The rows a sparse update addresses: the item tables' leading axis, other matrices' vectors along their
    last axis (a (4, 16, 64) array has 64 rows of 64)."""
    return array if array.ndim == 1 else array.reshape(-1, array.shape[-1])


def sampled_names(sent: dict[str, np.ndarray]) -> list[str]:
    """The shared arrays :func:`sample_rows` may sample: every matrix but the item tables with at least
    ``SAMPLED_MIN_ROWS`` rows (smaller ones, vectors and scalars go whole)."""
    return [
        k
        for k, v in sent.items()
        if k not in ITEM_TABLES and v.ndim >= 2 and len(rows_of(v)) >= SAMPLED_MIN_ROWS
    ]


def sample_rows(
    update: dict[str, np.ndarray], sent: dict[str, np.ndarray], fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``update`` with each of :func:`sampled_names` reduced to ``round(fraction * rows)`` random rows (at least
    one), each row's change from ``sent`` divided by the share sent, so that the mean over devices estimates the
    dense change without bias."""
    out: dict[str, np.ndarray] = {}
    for name in sampled_names(sent):
        total = len(rows_of(sent[name]))
        keep = max(1, round(fraction * total))
        rows = np.sort(rng.choice(total, size=keep, replace=False)).astype(ROW_IDS)
        out |= _weighted_rows(update, sent, [name], rows, np.full(keep, keep / total))
    return _replace_rows(update, out)


def split_states(
    update: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """``update`` without its output states (``STATE_KEYS``), and those states (None when it has none)."""
    if not any(k in update for k in STATE_KEYS):
        return update, None
    return {k: v for k, v in update.items() if k not in STATE_KEYS}, {
        k: update[k] for k in STATE_KEYS if k in update
    }


def is_sparse(update: dict[str, np.ndarray]) -> bool:
    return any(k.endswith(ROWS) for k in update)


def densify(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense arrays from a sparse update: rows not sent keep the ``reference`` (sent) values."""
    if not is_sparse(update):
        return dict(update)
    out = {k: v for k, v in update.items() if ROWS not in k and VALUES not in k}
    for name in (k.removesuffix(ROWS) for k in update if k.endswith(ROWS)):
        table = rows_of(reference[name].copy())
        table[update[name + ROWS]] = update[name + VALUES]
        out[name] = table.reshape(reference[name].shape)
    return out


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the int8 scales of an array: one per leading-axis row (2-D and up), else one in all."""
    return (shape[0],) + (1,) * (len(shape) - 1) if len(shape) >= 2 else (1,)


def reference_of(key: str, rows: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    """What the server sent for the array ``key`` of an uncompressed update (its rows for ``@values``)."""
    if key.endswith(VALUES):
        name = key.removesuffix(VALUES)
        return rows_of(reference[name])[rows[name + ROWS]]
    return reference[key]


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Levels -8..7 (any shape) two per byte: the flattened array's even elements in the low nibbles."""
    nibbles = (q.reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 levels of ``shape`` that :func:`pack_int4` packed."""
    nibbles = np.stack((packed & 0x0F, packed >> 4), axis=-1).reshape(-1)[: math.prod(shape)]
    return (nibbles.astype(np.int8) - 16 * (nibbles >= 8)).astype(np.int8).reshape(shape)


def packed_shape(suffix: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the quantized array (``@q8`` / ``@q4``) of a value of ``shape``."""
    return shape if suffix == Q8 else (-(-math.prod(shape) // 2),)


def quantized_suffix(kind: str, ndim: int) -> str:
    """The suffix an array of ``ndim`` dimensions is quantized to under compression ``kind`` (module docstring:
    ``int4`` sends vectors as int8)."""
    return Q8 if ndim < 2 else QUANTIZED[kind]


def compress(
    update: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    rng: np.random.Generator,
    kind: str = "int8",
) -> dict[str, np.ndarray]:
    """``int8`` or ``int4`` form of a (dense or sparse) update: per-row quantized changes from ``reference``."""
    rows = {k: v for k, v in update.items() if k.endswith(ROWS)}
    out: dict[str, np.ndarray] = dict(rows)
    for key, value in update.items():
        if key in rows:
            continue
        suffix = quantized_suffix(kind, value.ndim)
        levels = LEVELS[suffix]
        delta = value.astype(np.float64) - reference_of(key, rows, reference)
        axes = tuple(range(1, delta.ndim)) if delta.ndim >= 2 else None
        scale = np.abs(delta).max(axis=axes, keepdims=True).reshape(scale_shape(delta.shape)) / levels
        safe = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.floor(delta / safe + rng.random(delta.shape)), -levels, levels)
        out[key + suffix] = q.astype(np.int8) if suffix == Q8 else pack_int4(q)
        out[key + SCALE] = scale.astype(np.float32)
    return out


def compression(update: dict[str, np.ndarray]) -> str | None:
    """``int4`` or ``int8`` when ``update`` is compressed (``int4`` if any array is ``@q4``), else None."""
    suffixes = {s for k in update for s in (Q8, Q4) if k.endswith(s)}
    return None if not suffixes else "int4" if Q4 in suffixes else "int8"


def is_compressed(update: dict[str, np.ndarray]) -> bool:
    return compression(update) is not None


def decompress(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 (still possibly sparse) update of a compressed one; other updates are returned as they are."""
    if not is_compressed(update):
        return dict(update)
    rows = {k: v for k, v in update.items() if k.endswith(ROWS)}
    out: dict[str, np.ndarray] = dict(rows)
    for key, suffix in ((k[: -len(s)], s) for k in update for s in (Q8, Q4) if k.endswith(s)):
        ref = reference_of(key, rows, reference)
        q = update[key + suffix] if suffix == Q8 else unpack_int4(update[key + suffix], ref.shape)
        out[key] = (ref + q.astype(np.float64) * update[key + SCALE]).astype(np.float32)
    return out
