"""The on-device recommender: onnxruntime only, no torch, no flwr.

    with Recommender.open(bundle_dir, public_key, EncryptedStore(path, key=device_key)) as rec:
        rec.record("318", 1_700_000_000)      # O(1): one run of the step graph, state saved encrypted
        for r in rec.recommend(10): print(r.title, r.head, r.explanations)

The bundle is verified (signature over the manifest, then every file's sha256) before anything is loaded; a
bundle that fails is refused with a :class:`~shared_model.protocol.bundle.BundleError` and, for
:meth:`Recommender.upgrade`, the bundle in use stays in use. The device's personal weights (time encoder, LRU
blocks, interest heads) come from its encrypted store (the bundle's initial values for those it does not hold)
and reach the graphs as ordinary inputs, bound once; history, recurrent state and weights are kept in the
store.

Defined behaviour for awkward input:

* unknown item id: :class:`UnknownItem` (``on_unknown="error"``, the default) or ignored (``"ignore"``);
* a timestamp that is not a whole number of unix seconds in ``[0, 2**40)`` (milliseconds, negative, NaN, a
  string): :class:`RuntimeInputError`, nothing recorded; so is a ``k`` that is not an int in ``1..top_k``;
* a timestamp before the last event: :class:`OutOfOrderEvent` (``on_backwards="error"``) or recorded at the
  last event's time (``"clamp"``); an exact repeat of the last event (same item and time) is ignored;
* empty history (cold start): recommendations from the zero state (item bias and explanation priors);
* a bundle whose catalogue grew (old item ids are a prefix of the new ones): the history carries over and is
  re-encoded; any other catalogue change needs :meth:`Recommender.sync_history` with source ids;
* a store without recurrent state (older store format, a new bundle, new personal weights): the history is
  re-encoded through the sequence encoder graph (its last ``max_events`` events);
* a store another Recommender (or process) has open: :class:`~client_sdk.store.StoreInUse` at :meth:`open` (an
  open Recommender holds the store's writer lock until :meth:`close`), so no writer drops another's events;
  saving after :meth:`close` is a :class:`~client_sdk.store.StoreError`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared_model.data.readers import MAX_TIMESTAMP, milliseconds_hint
from shared_model.graph_io import (
    SPEC_FORMAT,
    encoder_inputs,
    exclude_mask,
    initial_personal,
    personalize,
    rank_states,
    run_session,
    session,
)
from shared_model.protocol.bundle import (
    CATALOGUE,
    BundleFormatError,
    Manifest,
    load_public_key,
    verify_bundle,
)
from shared_model.protocol.errors import DeviceRuntimeError

from .store import DeviceRecord, EncryptedStore, StoreError, WriterLock


class RuntimeInputError(DeviceRuntimeError, ValueError):
    """An event or request the runtime refuses; nothing was changed."""


def _unix_seconds(timestamp: object) -> int:
    """``timestamp`` as whole unix seconds in ``[0, MAX_TIMESTAMP)``, or a :class:`RuntimeInputError`."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float | np.integer | np.floating):
        raise RuntimeInputError(f"timestamp must be a number of unix seconds, got {timestamp!r}")
    if not (math.isfinite(timestamp) and float(timestamp).is_integer() and 0 <= timestamp < MAX_TIMESTAMP):
        raise RuntimeInputError(
            f"timestamp must be whole unix seconds in [0, 2**40), got {timestamp!r}{milliseconds_hint(timestamp)}"
        )
    return int(timestamp)


class UnknownItem(RuntimeInputError):
    """The item id is not in the bundle's catalogue."""


class OutOfOrderEvent(RuntimeInputError):
    """The event's timestamp is before the last recorded event's."""


class IncompatibleStore(RuntimeInputError):
    """The store's history or personal weights do not fit this bundle."""


@dataclass(frozen=True)
class Recommendation:
    item: str  # the catalogue's (source) item id
    title: str
    score: float
    head: int  # the interest head that contributed most to the score
    explanations: list[str]  # explanation texts, most likely first
    explanation_ids: list[int]  # their ids in the bundle catalogue's explanation vocabulary


def _recommendation(
    item: str, title: str, score: float, head: int, explanations: list[str], explanation_ids: list[int]
) -> Recommendation:
    """``Recommendation(...)`` without the frozen dataclass's per-field ``object.__setattr__`` calls (a third of
    the cost of ``recommend(10)``'s Python): the same object, its fields written to its ``__dict__``."""
    rec = object.__new__(Recommendation)
    fields = rec.__dict__
    fields["item"], fields["title"], fields["score"], fields["head"] = item, title, score, head
    fields["explanations"], fields["explanation_ids"] = explanations, explanation_ids
    return rec


@dataclass
class _Loaded:
    """One verified bundle's sessions and catalogue."""

    manifest: Manifest
    spec: dict[str, Any]
    item_ids: list[str]
    titles: list[str]
    explanations: list[str]
    index: dict[str, int]
    sessions: dict[str, Any]
    personal: dict[str, dict[str, np.ndarray]]  # graph -> its personal inputs (personalize.onnx's outputs)
    step: _BoundStep  # the step session, bound; its inputs hold the seen mask and the recurrent states

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @functools.cached_property
    def catalogue_sha(self) -> str:
        return _ids_sha(self.item_ids)


class _BoundStep:
    """The step graph bound once to preallocated arrays (onnxruntime IOBinding): writing the inputs in place
    and :meth:`run` neither converts nor allocates per event. ``outputs`` are overwritten by each run; the
    ``inputs`` of the recurrent ``states`` are the runtime's states.

    The personal inputs are bound once. The states and the ``state`` output are double-buffered: two bindings, each reading one set of state
    arrays and writing the ``next_<state>`` outputs into the other set (and ``state`` into its own array), so
    that :meth:`advance` swaps the sets instead of copying, and the state vector a run wrote stays valid
    through the next run (which writes the other one)."""

    def __init__(
        self,
        sess: ort.InferenceSession,
        graph: dict[str, Any],
        states: list[str],
        personal: dict[str, np.ndarray],
    ) -> None:
        self._sess, self.states = sess, states
        self.inputs = {v["name"]: _zeros(v) for v in graph["inputs"] if v["name"] not in personal}
        self.outputs = {v["name"]: _zeros(v) for v in graph["outputs"]}
        sets = (
            {name: self.inputs[name] for name in states} | {"state": self.outputs["state"]},
            {name: np.zeros_like(self.inputs[name]) for name in states}
            | {"state": np.zeros_like(self.outputs["state"])},
        )
        self._values = []  # the OrtValues share the arrays' memory; keep them alive with the bindings
        self._bindings = []
        for current, following in (sets, sets[::-1]):
            binding = sess.io_binding()
            inputs = self.inputs | {name: current[name] for name in states} | personal
            outputs = self.outputs | {f"next_{name}": following[name] for name in states}
            outputs["state"] = current["state"]
            for arrays, bind in (
                (inputs, binding.bind_ortvalue_input),
                (outputs, binding.bind_ortvalue_output),
            ):
                for name, array in arrays.items():
                    self._values.append(ort.OrtValue.ortvalue_from_numpy(array))
                    bind(name, self._values[-1])
            self._bindings.append((binding, {name: following[name] for name in states}, current["state"]))
        self._turn = 0

    def run(self) -> None:
        self._sess.run_with_iobinding(self._bindings[self._turn][0])

    def advance(self) -> None:
        """The last run's ``next_<state>`` outputs become the state inputs, its ``state`` output
        ``outputs["state"]`` (valid until the run after the next)."""
        _, following, state = self._bindings[self._turn]
        self.inputs.update(following)
        self.outputs["state"] = state
        self._turn ^= 1


def _zeros(value: dict[str, Any]) -> np.ndarray:
    """Zeros of a graph input/output spec at batch 1."""
    return np.zeros([1 if d == "batch" else d for d in value["shape"]], np.dtype(value["dtype"]))


def _ids_sha(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _load(manifest: Manifest, personal: dict[str, np.ndarray], threads: int) -> _Loaded:
    """Sessions of a verified bundle and the personal inputs for the device's personal weights (the bundle's
    initial values for those the store does not hold)."""
    spec = manifest.data["spec"]
    if spec.get("format") != SPEC_FORMAT:
        raise BundleFormatError(
            f"{manifest.root}: graph spec format {spec.get('format')!r}, this SDK runs {SPEC_FORMAT}; "
            "re-export the bundle (tmepsr export)"
        )
    name = manifest.data.get("catalogue", CATALOGUE)
    catalogue = json.loads(gzip.decompress(manifest.read(name)))
    initial = initial_personal(spec["personalize"], manifest.read(spec["personalize"]["initial"]))
    wrong = sorted(set(personal) - set(initial)) or [
        k for k in personal if initial[k].shape != personal[k].shape
    ]
    if wrong:  # a subset is fine (e.g. only the adapted parts): the others keep the bundle's values
        raise IncompatibleStore(
            f"the store's personal weights do not fit this bundle's model (e.g. {wrong[:3]})"
        )
    external = {spec["weights"]: manifest.read(spec["weights"])}
    values = personalize(manifest.read(spec["personalize"]["file"]), initial | personal, external)
    graphs = spec["graphs"]
    sessions = {g: session(manifest.read(v["file"]), threads, external, batch=1) for g, v in graphs.items()}
    feeds = {g: {n: values[n] for n in v["personal"]} for g, v in graphs.items()}
    ids = [str(i) for i in catalogue["item_ids"]]
    if len(ids) != spec["num_items"]:
        raise IncompatibleStore(f"catalogue has {len(ids)} items, the graphs {spec['num_items']}")
    step = _BoundStep(sessions["step"], graphs["step"], list(spec["states"]), feeds["step"])
    return _Loaded(
        manifest,
        spec,
        ids,
        catalogue.get("titles") or ids,
        catalogue.get("explanations", []),
        {i: n for n, i in enumerate(ids)},
        sessions,
        feeds,
        step,
    )


class Recommender:
    """Top-k recommendations with explanations for the device's user, from a verified bundle."""

    def __init__(
        self,
        loaded: _Loaded,
        store: EncryptedStore,
        record: DeviceRecord,
        on_unknown: Literal["error", "ignore"],
        on_backwards: Literal["error", "clamp"],
        threads: int,
        lock: WriterLock,
    ) -> None:
        if on_unknown not in ("error", "ignore") or on_backwards not in ("error", "clamp"):
            raise RuntimeInputError(
                f"on_unknown must be 'error' or 'ignore' and on_backwards 'error' or 'clamp', "
                f"got {on_unknown!r}, {on_backwards!r}"
            )
        self._loaded = loaded
        self._store = store
        self._lock: WriterLock | None = lock  # the store's writer lock, held until close()
        self._stored = record
        self.on_unknown, self.on_backwards, self.threads = on_unknown, on_backwards, threads
        self._items, self._times = record.items.tolist(), record.times.tolist()  # appended in O(1)
        self._seen[:] = exclude_mask([record.items], loaded.num_items)
        self._ranking: dict[str, np.ndarray] | None = None
        if self._stored_state_fits():
            self._set_states(record.state)
        else:
            self._reencode()

    # ------------------------------------------------------------------ opening and upgrading
    @classmethod
    def open(
        cls,
        bundle_dir: str | Path,
        public_key: Ed25519PublicKey | str | Path | bytes,
        store: EncryptedStore,
        *,
        on_unknown: Literal["error", "ignore"] = "error",
        on_backwards: Literal["error", "clamp"] = "error",
        threads: int = 1,
    ) -> Recommender:
        """Verify ``bundle_dir`` against the pinned ``public_key``, then load it with the personal weights and
        history in ``store`` (an empty history and the bundle's initial weights if the store does not exist)."""
        manifest = verify_bundle(bundle_dir, load_public_key(public_key))
        lock = store.writer_lock()
        try:
            record = (
                store.load()
                if store.exists()
                else DeviceRecord(np.zeros(0, np.int64), np.zeros(0, np.int64), {}, {}, {})
            )
            loaded = _load(manifest, record.weights, threads)
            _check_history(record, loaded)
            return cls(loaded, store, record, on_unknown, on_backwards, threads, lock)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        """Release the store (its writer lock); what was recorded with ``save=False`` since the last
        :meth:`save` is not written. Idempotent."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade(self, bundle_dir: str | Path, public_key: Ed25519PublicKey | str | Path | bytes) -> None:
        """Switch to a new bundle (new shared weights, perhaps a grown catalogue). It is verified and loaded
        completely before the switch; on any error the bundle in use stays in use and nothing changes. The
        history is re-encoded with the new weights and the store saved."""
        loaded = _load(
            verify_bundle(bundle_dir, load_public_key(public_key)), self._stored.weights, self.threads
        )
        _check_history(self._history_record(), loaded)
        self._loaded = loaded
        self._seen[:] = exclude_mask([self._items], loaded.num_items)
        self._reencode()
        self.save()

    @property
    def manifest(self) -> Manifest:
        return self._loaded.manifest

    @property
    def catalogue_ids(self) -> list[str]:
        """The bundle catalogue's source item ids (what :meth:`record` accepts), in dense-id order."""
        return self._loaded.item_ids

    @property
    def catalogue_titles(self) -> list[str]:
        """The catalogue's titles, in the order of :attr:`catalogue_ids`."""
        return self._loaded.titles

    @property
    def history(self) -> list[tuple[str, int]]:
        """The recorded events as (source item id, unix seconds), oldest first."""
        return [(self._loaded.item_ids[i], t) for i, t in zip(self._items, self._times, strict=True)]

    # ------------------------------------------------------------------ events
    def record(self, item: str | int, timestamp: int, *, save: bool = True) -> bool:
        """Add one event and update the recurrent state in O(1); returns False if the event was ignored
        (an unknown item with ``on_unknown="ignore"``, or a repeat of the last event). ``save=False`` defers
        writing the store (call :meth:`save`), e.g. when replaying many events."""
        t = _unix_seconds(timestamp)
        dense = self._dense(item)
        if dense is None:
            return False
        items, times = self._items, self._times
        if times and t < times[-1]:
            if self.on_backwards == "error":
                raise OutOfOrderEvent(
                    f"event ({item!r}, {t}) is before the last recorded event ({times[-1]}); "
                    "events must arrive in time order (or open with on_backwards='clamp')"
                )
            t = times[-1]
        if items and items[-1] == dense and times[-1] == t:
            return False
        step = self._loaded.step
        inputs, outputs = step.inputs, step.outputs
        seen = inputs["exclude"][0]
        was_seen = seen[dense]
        inputs["item"][0], inputs["timestamp"][0] = dense, t
        seen[dense] = True
        self._ranking = None  # the step's outputs are overwritten in place
        try:
            step.run()
        except Exception:
            seen[dense] = was_seen
            raise
        step.advance()
        self._state = outputs["state"]  # double-buffered: not overwritten by the next run
        self._ranking = outputs
        items.append(dense)
        times.append(t)
        if save:
            self.save()
        return True

    def sync_history(self, events: Iterable[tuple[str | int, int]]) -> None:
        """Replace the history (e.g. after a restore) with ``events`` (source item id, unix seconds), which
        must be known to the catalogue, whole unix seconds (as for :meth:`record`) and in time order; re-encode
        it and save. Nothing changes on error."""
        dense, times = [], []
        for item, timestamp in events:
            d, t = self._dense(item, strict=True), _unix_seconds(timestamp)
            if times and t < times[-1]:
                raise OutOfOrderEvent(f"events are not in time order at ({item!r}, {t})")
            dense.append(d)
            times.append(t)
        self._items, self._times = dense, times
        self._seen[:] = exclude_mask([dense], self._loaded.num_items)
        self._reencode()
        self.save()

    # ------------------------------------------------------------------ recommendations
    def recommend(
        self, k: int = 10, exclude_seen: bool = True, explanations: int = 2
    ) -> list[Recommendation]:
        """The top-``k`` items for the current state, each with score, title, driving interest head and its
        top explanation texts."""
        b = self._loaded
        top_k = b.spec["top_k"]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= top_k:
            raise RuntimeInputError(f"k must be in 1..{top_k} (the bundle's top_k), got {k}")
        ranking = self._ranking if exclude_seen else None
        if ranking is None or k > ranking["top_items"].shape[1]:
            exclude = self._seen if exclude_seen else np.zeros_like(self._seen)
            feeds = {"state": self._state, "exclude": exclude} | rank_states(b.spec, self._states)
            ranking = self._run("rank", feeds)
            if exclude_seen:
                self._ranking = ranking
        items = ranking["top_items"][0, :k].tolist()  # plain Python values: no per-element numpy indexing
        scores = ranking["top_scores"][0, :k].tolist()
        heads = ranking["top_heads"][0, :k].tolist()
        expl = ranking.get("top_explanations")
        why = (  # -1: the item has fewer attested explanations
            [[] for _ in range(k)]
            if expl is None
            else [[e for e in row if e >= 0] for row in expl[0, :k, :explanations].tolist()]
        )
        ids, titles, texts = b.item_ids, b.titles, b.explanations
        return [
            _recommendation(ids[item], titles[item], score, head, [texts[e] for e in row], row)
            for item, score, head, row in zip(items, scores, heads, why, strict=True)
            if score != -math.inf  # -inf: fewer than k unseen items (scores decrease)
        ]

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Write history, recurrent state and personal weights to the encrypted store (atomically)."""
        if self._lock is None:
            raise StoreError(f"{self._store.path}: this Recommender was closed; open the store again to save")
        self._stored = self._history_record()
        self._stored.state = {
            **{k: v[0].copy() for k, v in self._states.items()},
            "state": self._state[0].copy(),
        }
        self._stored.meta = {
            **self._stored.meta,
            "bundle": self._loaded.manifest.sha256,
            "catalogue_sha": self._loaded.catalogue_sha,
            "catalogue_size": self._loaded.num_items,
        }
        self._store.save(self._stored)

    # ------------------------------------------------------------------ internals
    def _history_record(self) -> DeviceRecord:
        rec = self._stored
        return DeviceRecord(
            np.array(self._items, np.int64), np.array(self._times, np.int64), rec.state, rec.weights, rec.meta
        )

    @property
    def _seen(self) -> np.ndarray:
        """The step graph's ``exclude`` input (1, num_items): True at the seen items."""
        return self._loaded.step.inputs["exclude"]

    @property
    def _states(self) -> dict[str, np.ndarray]:
        """The recurrent states (1, ...): the step graph's state inputs."""
        return {k: self._loaded.step.inputs[k] for k in self._loaded.step.states}

    def _set_states(self, values: dict[str, np.ndarray]) -> None:
        """Copy the recurrent states and the state vector (``"state"``), per row or with the batch
        dimension, into place."""
        for k, array in self._states.items():
            array[:] = values[k]
        self._state = np.array(values["state"], np.float32).reshape(1, -1)

    def _dense(self, item: str | int, strict: bool = False) -> int | None:
        dense = self._loaded.index.get(str(item))
        if dense is None and (strict or self.on_unknown == "error"):
            raise UnknownItem(
                f"item {item!r} is not in the bundle's catalogue ({self._loaded.num_items} items)"
            )
        return dense

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_session(self._loaded.sessions[graph], feeds | self._loaded.personal[graph])

    def _stored_state_fits(self) -> bool:
        state, spec = self._stored.state, self._loaded.spec
        return (
            self._stored.meta.get("bundle") == self._loaded.manifest.sha256
            and set(state) == {*spec["states"], "state"}
            and all(tuple(state[k].shape) == tuple(s["shape"]) for k, s in spec["states"].items())
        )

    def _reencode(self) -> None:
        """Recurrent state from the history's last ``max_events`` events through the sequence encoder."""
        spec = self._loaded.spec
        if not self._items:
            self._set_states({k: 0 for k in spec["states"]} | {"state": np.zeros(spec["d_model"])})
        else:
            n = spec["max_events"]
            out = self._run("encoder", encoder_inputs([self._items[-n:]], [self._times[-n:]], n))
            self._set_states(out)
        self._ranking = None


def _check_history(record: DeviceRecord, loaded: _Loaded) -> None:
    """A stored history carries over to a bundle whose catalogue is the one it was recorded with or grew from
    it (old ids a prefix of the new); anything else is refused."""
    meta = record.meta
    size = meta.get("catalogue_size")
    if size is not None and _ids_sha(loaded.item_ids[:size]) != meta.get("catalogue_sha"):
        raise IncompatibleStore(
            "the stored history was recorded against another item catalogue; "
            "call sync_history() with the events' source item ids"
        )
    if len(record.items) and int(record.items.max()) >= loaded.num_items:
        raise IncompatibleStore(
            f"stored history has item ids beyond this catalogue ({loaded.num_items} items)"
        )
