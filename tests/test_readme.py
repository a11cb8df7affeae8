"""README's Python block runs as it is written (with the bundled model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_python_block_and_a_short_text():
    assert len(_python_blocks()) == 1
    assert len(README.read_text().encode()) < 12_000  # a user's guide; the lab notebook is bench/RESULTS.md


@pytest.mark.slow
def test_readme_python_block_runs(tmp_path):
    code = _python_blocks()[0] + "\nassert 'Paris' in lm.chat([{'role': 'user', 'content': 'What is the capital of France?'}]).text\n"
    env = dict(os.environ, LEANFORMERS_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout
