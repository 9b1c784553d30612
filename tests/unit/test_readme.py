"""The README's promises that can be checked without running anything."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shell_blocks():
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(line for block in shell_blocks() for line in block.splitlines()
                    if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd.strip() in [line.strip() for line in ci]


def test_readme_demo_command_uses_demo_flag():
    first = shell_blocks()[0].strip()
    assert first.startswith("python3 -m venv .venv") and first.endswith("twistd -n ntonix --demo")
