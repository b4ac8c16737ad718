"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)  # the examples write a bundle and a store
    namespace: dict = {}  # the blocks continue one another
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert "ndcg@10" in capsys.readouterr().out
    assert (tmp_path / "bundle" / "manifest.sig").is_file() and (tmp_path / "me.store").is_file()
    assert len(namespace["device"].history) == 2
