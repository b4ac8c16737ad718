"""The README's Python example runs as written, and CI runs its test command."""

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


def test_ci_runs_the_readme_test_command_and_fails_on_failure():
    """`.ci/run` runs the README's test command verbatim, under `set -e` and `pipefail`, so a failing test (or
    pytest's exit code 5: no test ran) fails CI."""
    root = Path(__file__).parents[1]
    commands = re.findall(r"```bash\n(.*?)\n```", (root / "README.md").read_text(), flags=re.S)
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 1, commands
    ci = (root / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines()
    assert "set -euo pipefail" in ci
