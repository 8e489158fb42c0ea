"""The README's Python examples run as written (so the docs cannot drift from the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    repo = README.parent
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(repo / "configs")
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.strip(), "the example printed nothing"
    if "format_reward" in BLOCKS[index]:
        assert out.splitlines()[:2] == ["[1.0, 1.0]", "[1.0, 0.0]"]
