"""The README's API example runs as written, and the CLI demo agrees with autograd."""

import re
from pathlib import Path

from hessfast.cli import main

README = Path(__file__).parent.parent / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_demo_command_passes(capsys):
    assert main(["demo", "--batch-size", "64", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "OK" in out
