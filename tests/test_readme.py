"""The README's quickstart runs as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.timeout(180)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_and_prints_what_it_says(tmp_path):
    quickstart = python_blocks()[0]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart.replace("twinkle.initialize('dask', groups=[",
                                         "twinkle.initialize('dask', dashboard_address=None, groups=["))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "14.0"


def test_testing_example_runs(tmp_path):
    quickstart, example = python_blocks()[0], python_blocks()[-1]
    classes = quickstart.split("twinkle.initialize(")[0]
    script = tmp_path / "test_example.py"
    script.write_text(classes + "\n" + example)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)],
                          capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_readme_commands_exist():
    text = README.read_text()
    root = README.parent
    for script in re.findall(r"bash ((?:ci|benchmarks)/[\w./-]+\.sh)", text):
        assert (root / script).exists(), script
    for module in re.findall(r"python (benchmarks/[\w./-]+\.py)", text):
        assert (root / module).exists(), module
    for doc in re.findall(r"\]\(([\w./-]+\.md)\)", text):
        assert (root / doc).exists(), doc
