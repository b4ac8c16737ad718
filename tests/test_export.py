"""ONNX export: on real histories the step graph (rolled event by event), the sequence encoder
+ rank graphs and the torch model agree; personal weights are plain graph inputs (bundle format 4); the graphs
pass the onnx / onnxruntime checks; the int8 item table keeps the top-10."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shared_model.batching import input_batch
from shared_model.build import build_model
from shared_model.config import MODEL_PRESETS, TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.explanation import history_counts
from shared_model.export import ExportedGraphs, ExportError, check_graphs, export_model
from shared_model.graph_io import MAX_EVENTS, encoder_inputs, exclude_mask, initial_personal, run_session
from shared_model.model import TMEPSR, InterestHeads
from shared_model.partition import load_parts, parameter_groups, split_state
from shared_model.training import model_config_for, train_end_per_user, train_epoch
from simulations.exported_graphs import int8_effect, ort_session, personal_values, recommend_histories

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def log():
    return load_dataset("movielens-latest-small")


@pytest.fixture(scope="module")
def trained(log) -> TMEPSR:
    """A small TME-PSR (time encoder, 4 heads, explanations shown with the history prior) after two quick
    epochs."""
    torch.manual_seed(0)
    model = TMEPSR(model_config_for(log, d_model=32, num_heads=4, max_len=50, explanation_history_prior=1.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    train_end = train_end_per_user(log, LeaveOneOutSplit(log))
    rng = np.random.default_rng(0)
    for _ in range(2):
        train_epoch(model, optimizer, log, np.arange(log.num_users), train_end, TrainConfig(), rng)
    return model.eval()


def _candidates(log) -> np.ndarray:
    """The explanation ids attested for each item of ``log`` (what a bundle may show)."""
    return LeaveOneOutSplit(log).explanation_candidates


@pytest.fixture(scope="module")
def graphs(trained, log, tmp_path_factory) -> ExportedGraphs:
    return export_model(trained, tmp_path_factory.mktemp("fp32"), explanation_candidates=_candidates(log))


@pytest.fixture(scope="module")
def histories(log) -> tuple[np.ndarray, np.ndarray]:
    """60 users' first (at most 256) events as event ranges [start, end); lengths 20 to 256."""
    users = np.arange(60)
    starts = log.user_ptr[users]
    return starts, starts + np.minimum(log.sequence_lengths()[users], MAX_EVENTS)


def _events(log, starts, ends) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [log.item[a:b] for a, b in zip(starts, ends, strict=True)], [
        log.time[a:b] for a, b in zip(starts, ends, strict=True)
    ]


@torch.no_grad()
def _torch_state(model: TMEPSR, log, starts, ends) -> torch.Tensor:
    """The state vector after each history, by the model's own evaluation path (parallel scan)."""
    return model.encode(input_batch(log, starts, ends, MAX_EVENTS))[:, -1]


def _roll_step(
    graphs: ExportedGraphs, items, times, values: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Feed histories event by event through the step graph (rows end together; a row's states stay at zero
    until its first event): the outputs of the last call and the final states."""
    values = personal_values(graphs) if values is None else values
    personal = {name: values[name] for name in graphs.personal["step"]}
    session = ort_session(graphs, "step")
    schedule = encoder_inputs(items, times)  # left-padded: column j is every row's j-th event from the end
    states = {n: np.zeros((len(items), *s["shape"]), np.float32) for n, s in graphs.spec["states"].items()}
    exclude = exclude_mask(items, graphs.spec["num_items"])
    for j in np.flatnonzero(schedule["mask"].any(0)):
        feeds = {
            "item": schedule["items"][:, j],
            "timestamp": schedule["timestamps"][:, j],
            "exclude": exclude,
        }
        out = run_session(session, feeds | states | personal)
        active = schedule["mask"][:, j]
        for name, value in states.items():
            states[name] = np.where(active.reshape(-1, *[1] * (value.ndim - 1)), out[f"next_{name}"], value)
    return out | states


def _assert_matches_torch(model: TMEPSR, log, starts, ends, out: dict[str, np.ndarray]) -> float:
    """Scores, top-10, driving heads and explanation ids of graph outputs equal torch's; returns the top-10
    agreement (share of users with the identical top-10 list)."""
    state = _torch_state(model, log, starts, ends)
    items = torch.from_numpy(out["top_items"])
    with torch.no_grad():
        scores = model.item_scores(state)
        scores[torch.from_numpy(exclude_mask(_events(log, starts, ends)[0], log.num_items))] = -torch.inf
        heads = model.head_contributions(state, items).argmax(-1)
    assert np.abs(out["state"] - state.numpy()).max() <= TOL
    assert np.abs(out["top_scores"] - scores.gather(1, items).numpy()).max() <= TOL
    agreement = float((out["top_items"][:, :10] == scores.topk(10).indices.numpy()).all(1).mean())
    assert agreement >= 0.99
    assert np.array_equal(out["top_heads"], heads.numpy())
    if model.explanation is None:
        assert "top_explanations" not in out
    else:
        k, e = out["top_explanations"].shape[1:]
        with torch.no_grad():
            pairs = state[:, None].expand(-1, k, -1).reshape(-1, state.shape[-1])
            table = torch.from_numpy(_candidates(log))
            candidates = table[items.reshape(-1)]
            history = None
            if model.explanation.history_prior:  # the ids attested for each user's events' items, counted
                history = torch.cat(
                    [
                        history_counts(table[log.item[a:b]][None], len(log.vocab))
                        for a, b in zip(starts, ends, strict=True)
                    ]
                )
                assert np.array_equal(out["explanation_history"], history.numpy())
                history = model.explanation.history_bonus(history).repeat_interleave(k, 0)
            expl = model.explanation.shown_top(
                model.explanation_scores(pairs, items.reshape(-1)), candidates, e, history
            )
        assert np.array_equal(out["top_explanations"], expl.reshape(-1, k, e).numpy())
        # faithful: every shown explanation is attested for its item
        shown = out["top_explanations"].reshape(-1, e)
        assert all(
            set(row[row >= 0]) <= set(c[c >= 0]) for row, c in zip(shown, candidates.numpy(), strict=True)
        )
        assert (shown >= 0).any()
    return agreement


@pytest.mark.parametrize("time_unit", ["seconds", "days", "order"])
@torch.no_grad()
def test_reencode_reaches_the_states_of_rolling_step(log, histories, time_unit):
    torch.manual_seed(0)
    model = TMEPSR(model_config_for(log, d_model=16, time_unit=time_unit)).eval()
    starts, ends = histories[0][:8], np.minimum(histories[1][:8], histories[0][:8] + 64)
    feeds = {k: torch.from_numpy(v) for k, v in encoder_inputs(*_events(log, starts, ends), 64).items()}
    state, lru_state, time_state = model.reencode(feeds["items"], feeds["timestamps"], feeds["mask"])
    rolled = model.initial_state(len(starts))
    for j in range(64):
        y, *new = model.step(feeds["items"][:, j], feeds["timestamps"][:, j], *rolled)
        active = feeds["mask"][:, j]
        rolled = [
            torch.where(active.view(-1, *[1] * (s.dim() - 1)), n, s) for n, s in zip(new, rolled, strict=True)
        ]
    assert (state - y).abs().max() <= TOL  # every row's last event is at the last column
    assert (lru_state - rolled[0]).abs().max() <= TOL and (time_state - rolled[1]).abs().max() <= TOL


def test_step_and_encoder_graphs_match_torch_on_real_histories(trained, graphs, histories, log):
    starts, ends = histories
    items, times = _events(log, starts, ends)
    rolled = _roll_step(graphs, items, times)
    encoded = recommend_histories(graphs, items, times)
    for out in (rolled, encoded):
        _assert_matches_torch(trained, log, starts, ends, out)
    for name in graphs.spec["states"]:
        assert np.abs(rolled[name] - encoded[name]).max() <= TOL


def test_personal_inputs_reproduce_another_users_model(trained, graphs, histories, log):
    personal = parameter_groups(trained, "card")["personal"]
    params = dict(trained.named_parameters())
    initial = initial_personal(graphs.spec["personalize"], graphs.personal_init_path.read_bytes())
    assert list(initial) == personal  # the bundle carries the exported model's personal weights
    assert all(np.array_equal(initial[p], params[p].detach().numpy()) for p in personal)
    exported = personal_values(graphs)
    assert all(np.array_equal(exported[f"model.{p}"], params[p].detach().numpy()) for p in personal)
    for name, inputs in graphs.personal.items():  # every personal value is an input, none a stored tensor
        proto = onnx.load(graphs.path(name))
        assert [i.name for i in proto.graph.input][-len(inputs) :] == inputs
        assert not {t.name for t in proto.graph.initializer} & {*inputs, *(f"model.{p}" for p in personal)}
    personalize_graph = onnx.load(graphs.personalize_path).graph
    assert not {i.name for i in personalize_graph.input} & {t.name for t in personalize_graph.initializer}
    torch.manual_seed(1)
    _, weights = split_state(
        TMEPSR(trained.cfg), "card"
    )  # another user's personal weights; the shared part is ours
    other = copy.deepcopy(trained)
    load_parts(other, weights)
    values = personal_values(graphs, weights)
    starts, ends = histories
    items, times = _events(log, starts, ends)
    for out in (_roll_step(graphs, items, times, values), recommend_histories(graphs, items, times, values)):
        _assert_matches_torch(other, log, starts, ends, out)
    baked = recommend_histories(graphs, items, times)["state"]
    assert np.abs(baked - _torch_state(other, log, starts, ends).numpy()).max() > 0.1  # the override mattered


def test_graphs_pass_onnx_and_onnxruntime_checks(graphs):
    check_graphs(graphs.graph_paths)
    spec = json.loads(json.dumps(graphs.spec))
    for name, graph in spec["graphs"].items():
        session = ort_session(graphs, name)
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in graph["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in graph["outputs"]]
        own = [i for i in graph["inputs"] if i["name"] not in graph["personal"]]
        assert all(i["shape"][0] == "batch" for i in own)
        personal = {o["name"]: o for o in spec["personalize"]["outputs"]}
        assert all(i == personal[i["name"]] for i in graph["inputs"] if i["name"] in graph["personal"])
        assert set(graph["personal"]) <= {o["name"] for o in spec["personalize"]["outputs"]}
    assert spec["max_events"] == MAX_EVENTS and spec["top_k"] == 50 and spec["num_explanations_out"] == 3


def test_step_graph_ranks_the_shown_items_and_optimizes_to_fused_kernels(graphs, tmp_path):
    """The step graph ranks ``step_top_k`` items (the rank graph ``top_k``); onnxruntime fuses its GELUs and
    runs no Einsum (the slow kernel) nor per-call casts of constants."""
    shapes = {
        g: {o["name"]: o["shape"] for o in graphs.spec["graphs"][g]["outputs"]} for g in ("step", "rank")
    }
    assert graphs.spec["step_top_k"] == 10
    assert shapes["step"]["top_items"] == ["batch", 10] and shapes["step"]["top_explanations"] == [
        "batch",
        10,
        3,
    ]
    assert shapes["rank"]["top_items"] == ["batch", 50]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "step.optimized.onnx")
    options.add_free_dimension_override_by_name("batch", 1)
    ort.InferenceSession(str(graphs.path("step")), options, providers=["CPUExecutionProvider"])
    ops = [
        n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node
    ]
    assert ops.count("Gelu") == 3 and not {"Erf", "Einsum", "CastLike"} & set(ops)


def test_interest_heads_compute_what_einsum_computes_bit_for_bit():
    """The heads' batched matmul (an ONNX MatMul) is the einsum it replaced, forward and backward."""
    torch.manual_seed(0)
    heads = InterestHeads(32, 4)
    for shape in [(6, 32), (4, 50, 32)]:
        y = torch.randn(*shape, requires_grad=True)
        v, _ = heads(y)
        ref = torch.einsum("...hk,hkd->...hd", y.unflatten(-1, (4, -1)), heads.proj)
        norms = ref.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        ref = ref * (norms.mean(-2, keepdim=True) / norms)  # a state's heads get equal norms
        assert torch.equal(v, ref)
        torch.testing.assert_close(v.norm(dim=-1), v.norm(dim=-1)[..., :1].expand_as(v[..., 0]))
        grads = [torch.autograd.grad(out.square().sum(), (y, heads.proj)) for out in (v, ref)]
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_encoder_limit_and_models_without_a_step_are_refused(log, tmp_path):
    with pytest.raises(ValueError, match="at most 256 events"):
        encoder_inputs([np.zeros(MAX_EVENTS + 1, dtype=np.int64)], [np.zeros(MAX_EVENTS + 1, dtype=np.int64)])
    sasrec = build_model(model_config_for(log, d_model=16, **MODEL_PRESETS["sasrec"]))
    with pytest.raises(ExportError, match="SASRec has no O\\(1\\) step"):
        export_model(sasrec, tmp_path)


@pytest.mark.slow
def test_int8_weights_keep_the_top10_and_shrink_the_bundle(trained, graphs, log, tmp_path):
    int8 = export_model(trained, tmp_path, explanation_candidates=_candidates(log), int8=True)
    layout = {v["name"]: v for v in int8.spec["personalize"]["inputs"]}
    assert int8.spec["int8"] and [(v["name"], v["shape"]) for v in layout.values()] == [
        (v["name"], v["shape"]) for v in graphs.spec["personalize"]["inputs"]
    ]
    assert layout["encoder.blocks.0.ffn.0.weight"]["encoding"] == "int8-rows"
    assert layout["interests.gate.bias"]["encoding"] == "float32"  # vectors stay float32
    initial = {
        name: initial_personal(g.spec["personalize"], g.personal_init_path.read_bytes())
        for name, g in (("fp32", graphs), ("int8", int8))
    }
    for name, value in initial["fp32"].items():  # each row within half a quantization step
        step = np.abs(value).max(-1, keepdims=True) / 127 if value.ndim >= 2 else 0
        assert np.all(np.abs(initial["int8"][name] - value) <= step / 2 + 1e-7)
    effect = int8_effect(graphs, int8, log, LeaveOneOutSplit(log).eval_users)
    print(f"int8 vs fp32: {effect}")
    assert effect["top10_overlap"] >= 0.98
    table_bytes = trained.item_emb.weight[1:].numel() * 4
    personal_bytes = sum(v.nbytes for v in initial["fp32"].values() if v.ndim >= 2 and v.size >= 1024)
    assert effect["bytes_fp32"] - effect["bytes_int8"] > 0.7 * (table_bytes + personal_bytes)  # 1 byte, not 4
    assert abs(effect["recall@10_int8"] - effect["recall@10_fp32"]) <= 0.01


@pytest.mark.parametrize(
    ("preset", "time_unit", "options"),
    [
        ("lrurec", "seconds", {}),
        ("tmepsr-no-explanations", "order", {}),
        ("lrurec", "order", {"embed_norm": True, "lru_state_expansion": 2}),
    ],
)
def test_lru_presets_export_and_match_torch(log, tmp_path, preset, time_unit, options):
    torch.manual_seed(0)
    model = TMEPSR(
        model_config_for(log, d_model=16, **(MODEL_PRESETS[preset] | {"time_unit": time_unit} | options))
    )
    with torch.no_grad():
        model.item_emb.weight.mul_(
            25
        )  # spread the scores of the untrained model (no near-ties in the top-10)
    graphs = export_model(model.eval(), tmp_path, top_k=20, explanation_candidates=_candidates(log))
    assert ("time_state" in graphs.spec["states"]) == model.cfg.use_time
    starts = log.user_ptr[:16]
    ends = starts + np.minimum(log.sequence_lengths()[:16], 40)
    items, times = _events(log, starts, ends)
    for out in (_roll_step(graphs, items, times), recommend_histories(graphs, items, times)):
        _assert_matches_torch(model, log, starts, ends, out)


def _external(path) -> dict[str, tuple[int, int]]:
    """(offset, length) in the weights file of each external initializer of one graph."""
    proto = onnx.load(path, load_external_data=False)
    return {
        t.name: (int(entries["offset"]), int(entries["length"]))
        for t in proto.graph.initializer
        if (entries := {e.key: e.value for e in t.external_data})
    }


def test_weights_file_stores_each_tensor_once_and_personal_inputs_are_required(graphs, histories, log):
    table = "model.item_emb.weight"
    where = {name: _external(graphs.path(name)) for name in graphs.personal}
    assert len({where[name][table] for name in where}) == 1  # step, rank and encoder read the same bytes
    blob = graphs.weights_path.read_bytes()
    assert all(offset + length <= len(blob) for refs in where.values() for offset, length in refs.values())
    distinct = {
        ref for refs in [*where.values(), _external(graphs.personalize_path)] for ref in refs.values()
    }
    assert len(blob) <= sum(length for _, length in distinct) + 64 * len(distinct)  # nothing stored twice
    # a run without the personal inputs is an error, never a plausible answer from baked-in values
    starts, ends = histories
    items, times = _events(log, starts[:3], ends[:3])
    with pytest.raises(Exception, match="[Mm]issing|[Rr]equired"):
        run_session(ort_session(graphs, "encoder"), encoder_inputs(items, times))
