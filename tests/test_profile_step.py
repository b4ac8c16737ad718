"""The step profiler runs on the embedded dataset and reports every phase."""

import json

import pytest
import torch

from simulations.profile_step import PHASES, main


def test_profile_step_reports_each_phase(tmp_path):
    out = tmp_path / "step.json"
    main(["--dataset", "movielens-latest-small", "--steps", "2", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["ms_per_step"]) == {*PHASES, "total"}
    assert all(v >= 0 for v in result["ms_per_step"].values())
    assert result["ms_per_step"]["forward"] > 0 and result["validation_seconds"] > 0
    assert result["device"] == "cpu" and result["batch_size"] == 32  # latest-small's suite setting


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_profile_step_without_cuda_says_so():
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        main(["--device", "cuda"])
