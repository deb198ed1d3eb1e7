"""The README shows the Lightning and Hugging Face scripts that tests/test_integrations.py
runs, as they are in examples/ (their module docstrings aside), so the two cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["lightning_gossip.py", "huggingface_gossip.py"])
def test_the_readme_shows_the_example_as_it_is(script: str) -> None:
    text = (ROOT / "examples" / script).read_text()
    code = text[text.index('"""', 3) + 3 :].lstrip("\n")
    assert "# gossip" in code
    assert f"```python\n{code}```" in (ROOT / "README.md").read_text()
