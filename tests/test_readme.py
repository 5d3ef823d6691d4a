"""The README's examples run as written, and the commands it documents have the options it names."""

import re
from pathlib import Path

import pytest

from hessfast.cli import subcommand

README = Path(__file__).parent.parent / "README.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README has no python example"
    assert any("HessianMonitor(" in code for code in BLOCKS)  # its files are checked below


@pytest.mark.slow  # the README's examples: seconds each (training with the monitor, plots)
@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_api_example_runs(code, tmp_path, monkeypatch):
    """Each example on its own (each imports what it uses), so that pytest-xdist spreads them."""
    monkeypatch.chdir(tmp_path)  # the examples write files (the training monitor's JSONL and plot)
    exec(compile(code, "README.md", "exec"), {})
    if "HessianMonitor(" in code:
        assert (tmp_path / "hessian_monitor.jsonl").read_text().count("\n") == 4
        assert (tmp_path / "curvature.png").exists()


def _options(name: str) -> set[str]:
    return {s for a in subcommand(name)._actions for s in a.option_strings}


def test_readme_setup_runs_the_demo_with_its_options():
    setup = README.read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "pip install -e . && hessfast demo " in setup
    named = set(re.findall(r"`(--[a-z-]+)", setup))
    assert named and named <= _options("demo"), named - _options("demo")


def test_readme_analyze_usage_matches_the_parser():
    usage = re.search(r"```bash\nhessfast analyze (.*?)```", README.read_text(), re.S).group(1)
    named = set(re.findall(r"(--[a-z-]+)", usage))
    assert named and named <= _options("analyze"), named - _options("analyze")


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs the suite exactly as the README's set-up line and its development section
    say (the same pytest line, the whole suite), and the development loop is that line with
    ``-m "not slow"``."""
    readme = README.read_text()
    setup = re.search(r'-e "\.\[test\]" && (python -m pytest[^#\n]*?)\s+#', readme).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    ci_lines = [ln for ln in ci.splitlines() if ln.startswith("python -m pytest")]
    assert ci_lines == [setup], (ci_lines, setup)
    dev = README.read_text().split("## Development", 1)[1]
    dev_lines = re.findall(r"^(python -m pytest[^#\n]*?)\s+#", dev, re.M)
    assert dev_lines == [setup, f'{setup} -m "not slow"'], dev_lines
