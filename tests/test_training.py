"""Centralized training: a run interrupted and resumed from its saved state ends exactly as an uninterrupted
one; resuming refuses a state saved for another model or other training settings."""

from __future__ import annotations

import pytest
import torch

from shared_model.build import build_model
from shared_model.config import TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.training import fit, model_config_for


@pytest.fixture(scope="module")
def data():
    log = load_dataset("movielens-latest-small")
    return log, LeaveOneOutSplit(log)


def _model(log, **over):
    torch.manual_seed(0)
    return build_model(model_config_for(log, **({"d_model": 16, "max_len": 20, "num_heads": 2} | over)))


def _cfg(**over) -> TrainConfig:
    return TrainConfig(**({"batch_size": 128, "max_epochs": 4, "patience": 10, "seed": 3} | over))


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resumed_run_equals_uninterrupted_run(data, tmp_path):
    log, split = data
    whole_model = _model(log)
    whole = fit(whole_model, log, split, _cfg(), progress=False)

    state = tmp_path / "train_state.pt"
    first = fit(_model(log), log, split, _cfg(max_epochs=2), progress=False, state_path=state)
    assert first.stopped == "max_epochs" and len(first.history) == 2 and state.exists()
    torch.manual_seed(123)  # the resuming process starts from another random state
    resumed_model = _model(log, dropout=0.2)
    resumed = fit(resumed_model, log, split, _cfg(), progress=False, state_path=state)

    assert _without_time(resumed.history) == _without_time(whole.history)
    assert (resumed.best_epoch, resumed.best_val, resumed.test) == (
        whole.best_epoch,
        whole.best_val,
        whole.test,
    )
    a, b = whole_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a finished run resumed again trains no further and reports the same result
    again = fit(_model(log), log, split, _cfg(), progress=False, state_path=state)
    assert again.test == whole.test and len(again.history) == 4


def test_resume_refuses_other_model_or_settings(data, tmp_path):
    log, split = data
    state = tmp_path / "train_state.pt"
    fit(_model(log), log, split, _cfg(max_epochs=1), progress=False, state_path=state)
    with pytest.raises(ValueError, match="another model config"):
        fit(_model(log, d_model=32), log, split, _cfg(), progress=False, state_path=state)
    with pytest.raises(ValueError, match="lr"):
        fit(_model(log), log, split, _cfg(lr=0.01), progress=False, state_path=state)
    # a state saved before a model field was added (it takes its default) still resumes
    payload = torch.load(state, weights_only=True)
    del payload["model_config"]["embed_norm"]
    torch.save(payload, state)
    # the stopping rules may change
    result = fit(_model(log), log, split, _cfg(max_epochs=2, patience=3), progress=False, state_path=state)
    assert len(result.history) == 2
