"""TME-PSR model: step == scan, ablation switches, head attribution, partition, checkpoints, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.batching import Batch, input_batch, training_batch, training_windows
from shared_model.build import build_model
from shared_model.config import ModelConfig, TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.model import TMEPSR
from shared_model.partition import SPLITS, parameter_groups
from shared_model.top_k import head_profiles, head_sources, head_usage
from shared_model.training import (
    evaluate,
    fit,
    load_checkpoint,
    model_config_for,
    save_checkpoint,
    train_end_per_user,
)


@pytest.fixture(scope="module")
def log():
    return load_dataset("movielens-latest-small")


def _small(log, **over) -> ModelConfig:
    return model_config_for(log, **({"d_model": 32, "num_heads": 4, "max_len": 200} | over))


@pytest.mark.parametrize("options", [{}, {"embed_norm": True, "lru_state_expansion": 2}])
def test_step_rolled_over_200_events_matches_scan(log, options):
    torch.manual_seed(0)
    model = TMEPSR(_small(log, **options)).eval()
    users = np.flatnonzero(log.sequence_lengths() >= 200)[:4]
    starts = log.user_ptr[users]
    batch = input_batch(log, starts, starts + 200, max_len=200)
    with torch.no_grad():
        scan_scores = model.item_scores(model.encode(batch)[:, -1])
        lru_state, time_state = model.initial_state(len(users))
        for j in range(200):
            ev = starts + j
            y, lru_state, time_state = model.step(
                torch.as_tensor(log.item[ev]), torch.as_tensor(log.time[ev]), lru_state, time_state
            )
        step_scores = model.item_scores(y)
    assert (scan_scores - step_scores).abs().max().item() <= 1e-4
    assert torch.equal(scan_scores.topk(10).indices, step_scores.topk(10).indices)


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"use_time": False},
        {"num_heads": 1},
        {"use_explanations": False},
        {"dynamic_mi": False},
        {"mi_per_user": False},
        {"kind": "sasrec", "use_time": False, "use_explanations": False, "num_heads": 2},
        {"kind": "gru4rec", "use_time": False, "use_explanations": False, "num_heads": 1, "num_blocks": 1},
    ],
)
def test_every_ablation_trains_from_one_code_path(log, switches):
    torch.manual_seed(0)
    model = build_model(_small(log, max_len=50, **switches))
    split = LeaveOneOutSplit(log)
    users = np.arange(64)
    starts, ends = training_windows(
        log.user_ptr, train_end_per_user(log, split), users, 50, np.random.default_rng(0)
    )
    batch = training_batch(log, starts, ends, 50)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first, _ = model.loss(batch)
    for _ in range(5):
        opt.zero_grad()
        loss, parts = model.loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    assert ("ce_expl" in parts) == (model.explanation is not None)
    multi = model.cfg.kind == "tmepsr" and model.cfg.num_heads > 1
    assert ("balance_responsibility" in parts) == multi
    assert (model.explanation is not None) == model.cfg.use_explanations


def test_each_item_is_scored_by_its_driving_head(log):
    torch.manual_seed(0)
    model = TMEPSR(_small(log)).eval()
    batch = input_batch(log, log.user_ptr[:3], log.user_ptr[:3] + 30, 200)
    with torch.no_grad():
        last = model.encode(batch)[:, -1]
        scores = model.item_scores(last)
        top = scores.topk(10).indices
        contrib = model.head_contributions(last, top)
    assert contrib.shape == (3, 10, 4)
    rebuilt = contrib.logsumexp(-1) + model.item_bias[1:][top]
    torch.testing.assert_close(rebuilt, scores.gather(1, top), atol=1e-5, rtol=1e-5)
    # per-item routing: an untrained model's top-10s already draw on several heads
    assert contrib.argmax(-1).unique().numel() >= 2
    usage = head_usage(model, log, np.arange(20))
    assert usage["users"] == 20 and 0 < usage["multi_head_users"] <= 1
    assert abs(sum(usage["head_shares"]) - 1) < 0.01 and len(usage["head_shares"]) == 4
    assert len(usage["head_favours"]) == 4
    assert all(text in log.vocab.texts for row in usage["head_favours"] for text in row)


def test_top_items_ranks_as_the_item_scores_without_a_log_per_item(log):
    """The exported graphs' ranking (log-free, bias and priors inside the scoring matmul) gives item_scores'
    top-k and scores, excluded items never ranked above the rest; checked in float64 on trained-scale logits."""
    torch.manual_seed(0)
    model = TMEPSR(_small(log)).double().eval()
    with torch.no_grad():
        model.item_bias.normal_(0, 3)  # a spread of biases like a trained model's
        states = torch.randn(5, 32, dtype=torch.float64) * 4
        exclude = torch.rand(5, log.num_items) < 0.3
        exclude[4, :-3] = True  # a state with only 3 rankable items: the rest come back at -inf
        expected = model.item_scores(states).masked_fill(exclude, -torch.inf).topk(10)
        scores, items = model.top_items(states, exclude, 10)
    assert torch.equal(items[:4], expected.indices[:4])
    torch.testing.assert_close(scores, expected.values, atol=1e-9, rtol=1e-9)
    assert not exclude[4, items[4, :3]].any() and torch.isinf(scores[4, 3:]).all()


def test_head_sources_are_the_users_history_items_each_head_scores_highest(log):
    """Per asked head: the user's recent distinct items whose largest head term is that head's, strongest first,
    at most n; a head that wins none of them gets an empty list."""
    torch.manual_seed(0)
    model = TMEPSR(_small(log, max_len=30)).eval()
    user = int(np.flatnonzero(log.sequence_lengths() >= 40)[0])
    lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
    sources = head_sources(model, log, user, [2, 0, 1, 3, 0], n=2)
    assert list(sources) == [2, 0, 1, 3]  # each head once, in the order asked
    recent = list(dict.fromkeys(log.item[hi - 30 : hi][::-1].tolist()))
    with torch.no_grad():
        state = model.encode(input_batch(log, np.array([lo]), np.array([hi]), 30))[:, -1]
        terms = model.head_contributions(state, torch.tensor([recent]))[0]
    for h, items in sources.items():
        assert len(items) <= 2 and set(items) <= set(recent)
        rows = [recent.index(i) for i in items]
        assert all(int(terms[r].argmax()) == h for r in rows)
        assert [float(terms[r, h]) for r in rows] == sorted((float(terms[r, h]) for r in rows), reverse=True)
        won = [r for r in range(len(recent)) if int(terms[r].argmax()) == h]
        assert len(items) == min(2, len(won))
        if won:
            assert float(terms[rows[0], h]) == max(float(terms[r, h]) for r in won)


def test_head_profiles_name_what_each_head_favours():
    """Each head's profile is the labels over-represented among the items it drove (share among its items minus
    share among all); a label every item carries, or one too rare among a head's items, never profiles it; a
    head that drove nothing has none."""
    # items 0-3 carry label 0, items 4-7 label 1, item 8 label 3; every item carries label 2
    candidates = np.array([[0, 2]] * 4 + [[1, 2]] * 4 + [[3, 2]])
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 4, 8])
    heads = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    profiles = head_profiles(heads, items, candidates, num_heads=3)
    assert profiles[0][0] == 0 and profiles[1][0] == 1  # the head's own label first
    assert all(2 not in p for p in profiles)  # on every item: says nothing about a head
    assert profiles[1] == [1, 3]  # label 1: 80% of head 1's items vs 50% of all; label 3: 20% vs 10%
    assert 3 not in head_profiles(heads, items, candidates, num_heads=3, min_share=0.25)[1]
    assert profiles[2] == []  # head 2 drove nothing
    assert head_profiles(heads, items, np.full((9, 1), -1), num_heads=3) == [[], [], []]
    assert head_profiles(heads, items, candidates, num_heads=3, top=1)[1] == [1]


@pytest.mark.parametrize("kind", ["tmepsr", "sasrec", "gru4rec"])
def test_partition_covers_every_parameter_once(log, kind):
    model = build_model(_small(log, kind=kind, **({"use_explanations": False} if kind != "tmepsr" else {})))
    names = {n for n, _ in model.named_parameters()}
    for split in SPLITS:
        groups = parameter_groups(model, split)
        assert sum(len(g) for g in groups.values()) == len(names)
        assert set(groups["personal"]) | set(groups["shared"]) | set(groups["adapted"]) == names
    card = parameter_groups(model, "card")
    assert all(n.split(".")[0] in {"item_emb", "item_bias", "explanation"} for n in card["shared"])
    if kind == "tmepsr":
        assert any(n.startswith("time_encoder.") for n in card["personal"])
        assert any(n.startswith("encoder.") for n in card["personal"])
    population = parameter_groups(model, "population")
    assert population["personal"] == []  # the whole model is learned from many users
    if kind == "tmepsr":  # each device adapts its own time encoder and interest heads
        assert {n.split(".")[0] for n in population["adapted"]} == {"time_encoder", "interests"}


def test_gru4rec_ignores_left_padding(log):
    """Packed sequences: a history gives the same states however much padding precedes it."""
    torch.manual_seed(0)
    model = build_model(_small(log, kind="gru4rec", use_explanations=False, num_blocks=1)).eval()
    starts = log.user_ptr[:3]
    with torch.no_grad():
        short = model.encode(input_batch(log, starts, starts + 20, 20))
        long = model.encode(input_batch(log, starts, starts + 20, 60))
    torch.testing.assert_close(long[:, -20:], short)
    assert torch.count_nonzero(long[:, :40]) == 0


def test_checkpoint_roundtrip_is_bit_identical(log, tmp_path):
    model = TMEPSR(_small(log))
    save_checkpoint(tmp_path / "m.pt", model, {"dataset": log.name})
    again, extra = load_checkpoint(tmp_path / "m.pt")
    assert extra == {"dataset": log.name} and again.cfg == model.cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_items=10, num_explanations=3, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="explanation vocabulary"):
        ModelConfig(num_items=10, num_explanations=0)


def test_fit_improves_over_random_and_evaluates_explanations(log):
    model = TMEPSR(_small(log, max_len=50))
    split = LeaveOneOutSplit(log)
    before = evaluate(model, log, split, "val")
    result = fit(model, log, split, TrainConfig(max_epochs=2, patience=5, batch_size=64), progress=False)
    assert result.best_val["ndcg@10"] > before["ndcg@10"]
    assert 0 < result.test["expl_recall@10"] <= 1 and result.test["users"] == 610
    # among the item's attested ids: a label the item never had in training is a miss there, never a hit
    assert 0 < result.test["expl_attested_recall@10"] <= 1
    assert len(result.history) == 2


def _balance_setup(log, users: int) -> tuple[TMEPSR, Batch]:
    """A seeded 4-head model with only the responsibility balance among the head terms, and one training window
    for each of the first ``users`` users."""
    torch.manual_seed(0)
    model = TMEPSR(_small(log, max_len=50, gamma=0.0, head_balance=0.0, use_explanations=False))
    split = LeaveOneOutSplit(log)
    starts, ends = training_windows(
        log.user_ptr, train_end_per_user(log, split), np.arange(users), 50, np.random.default_rng(0)
    )
    return model, training_batch(log, starts, ends, 50)


def test_responsibility_balance_is_the_kl_of_the_heads_target_shares_from_uniform(log):
    """L_resp = KL(mean over targets of softmax_h(term at the target) || uniform)."""
    from shared_model.softmax_ce import target_terms

    model, batch = _balance_setup(log, users=16)
    _, parts = model.eval().loss(batch)
    has_target = batch.targets > 0
    a, prior = model.interests.coordinates(model.encode(batch)[has_target])
    tables = model.interests.item_tables(model.item_emb.weight[1:])
    share = target_terms(a, prior, tables, batch.targets[has_target] - 1).softmax(-1).mean(0)
    expected = float((share * (share * 4).log()).sum().detach())
    assert parts["balance_responsibility"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert parts["loss"] == pytest.approx(parts["ce_items"] + 0.1 * expected, rel=1e-5)


def test_population_shares_steer_the_responsibility_balance_toward_unused_heads(log):
    """With the population's head shares (a federated device's one-user batch), the balance term is the KL's
    gradient there applied to the batch's shares: zero at uniform shares, and it rewards the heads the
    population under-uses (floored at a tenth of uniform)."""
    model, batch = _balance_setup(log, users=1)
    model.train()
    torch.manual_seed(1)
    _, own = model.loss(batch)
    share = torch.tensor([own[f"head_share_{h}"] for h in range(4)])
    assert share.sum().item() == pytest.approx(1, abs=1e-5)
    model.population_share = torch.full((4,), 0.25)
    torch.manual_seed(1)
    _, uniform = model.loss(batch)
    assert uniform["balance_responsibility"] == 0
    population = torch.tensor([0.7, 0.0, 0.2, 0.1])
    model.population_share = population
    torch.manual_seed(1)
    _, steered = model.loss(batch)
    expected = float((share * (population * 4).clamp_min(0.1).log()).sum())
    assert steered["balance_responsibility"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("preset", ["tmepsr", "tmepsr-no-time", "lrurec", "sasrec", "gru4rec"])
def test_length_groups_give_the_full_grids_states(preset):
    """``encode`` runs short rows in grids trimmed to their group's width: at every event the states are the
    full grid's (padding changes no state), rows keep their order, and the loss is the same."""
    from shared_model.config import MODEL_PRESETS

    rng = np.random.default_rng(0)
    rows, width = 24, 50
    lengths = np.array([0, 1, 7, 8, 9, 16, 17, 33, 49, 50, *rng.integers(1, 51, rows - 10)])
    mask = torch.from_numpy(np.arange(width)[None] >= width - lengths[:, None])
    items = torch.where(mask, torch.from_numpy(rng.integers(1, 300, (rows, width))), 0)
    times = torch.from_numpy(1_500_000_000 + np.cumsum(rng.integers(0, 200_000, (rows, width)), 1))
    targets = torch.where(mask, torch.from_numpy(rng.integers(1, 300, (rows, width))), 0)
    batch = Batch(items, times, mask, targets)
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=299, num_explanations=0, d_model=16, max_len=width, use_explanations=False)
    model = build_model(ModelConfig(**(cfg.__dict__ | MODEL_PRESETS[preset]))).eval()
    with torch.no_grad():
        grid, grouped = model.encode_grid(batch), model.encode(batch)
        torch.testing.assert_close(grouped[mask], grid[mask], rtol=1e-5, atol=1e-6)
        loss = model.loss(batch)[0]
        model.encode = model.encode_grid  # the loss over the full grid
        torch.testing.assert_close(loss, model.loss(batch)[0], rtol=1e-5, atol=1e-6)


def test_off_the_cpu_a_batch_is_one_grid_and_the_loss_takes_large_chunks(monkeypatch):
    """On a GPU each kernel launch costs more than padded cells: ``encode`` runs the whole grid in one call and
    the fused loss takes chunks of ``CE_CHUNK_LOGITS["gpu"]`` logits (a Beauty step 105 -> 18 ms on an H200).
    Checked on the meta device, which stands for any non-CPU one; the CPU keeps its length groups."""
    from shared_model import softmax_ce

    cfg = ModelConfig(num_items=299, num_explanations=0, d_model=16, max_len=50, use_explanations=False)
    model = build_model(cfg)
    calls = []
    monkeypatch.setattr(model, "encode_grid", lambda b: calls.append(b) or torch.zeros(*b.items.shape, 16))
    mask = torch.arange(50)[None] >= torch.tensor([[45], [10]])  # rows of 5 and 40 events: two groups
    batch = Batch(torch.where(mask, 3, 0), torch.zeros(2, 50, dtype=torch.long), mask)
    model.encode(batch)
    assert [b.items.shape[1] for b in calls] == [8, 50]
    calls.clear()
    meta = Batch(batch.items.to("meta"), batch.times.to("meta"), batch.mask.to("meta"))
    model.encode(meta)
    assert [b.items.shape[1] for b in calls] == [50]

    chunks = []
    monkeypatch.setattr(softmax_ce._MeanLogPartition, "apply", lambda *args: chunks.append(args[-1]))
    for device in ("cpu", "meta"):
        a, tables = torch.zeros(5000, 4, 16, device=device), torch.zeros(4, 12101, 16, device=device)
        softmax_ce.mean_log_partition(a, torch.zeros(5000, 4, device=device), tables, torch.zeros(12101))
    assert chunks == [(1 << 20) // (4 * 12101), (1 << 27) // (4 * 12101)]
