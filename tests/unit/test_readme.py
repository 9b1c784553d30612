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


def reference_rows():
    text = (ROOT / "README.md").read_text()
    table = text.split("Every setting:", 1)[1]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
        elif rows and not line.startswith("|"):
            break
    return rows


def test_configuration_reference_matches_the_config_tree_both_ways():
    import json

    from ntonix import config as c
    from ntonix.tap import Options

    rows = reference_rows()
    keys = [k for k, _ in c.all_settings()]
    assert sorted(rows) == sorted(keys)  # nothing missing, nothing extra
    flags = {v: k for k, v in Options.FLAG_SETTINGS.items()}
    flags["demo.enabled"] = "demo"
    for key, f in c.all_settings():
        name, _type, default, env, cli, meaning = rows[key]
        assert default == f"`{json.dumps(c.default_of(f))}`", key
        assert f"`{c.env_name(key)}`" in env, key
        expected_cli = f"`--{flags[key]}`" if key in flags else f"`--set {key}=`"
        assert cli == expected_cli, key
        assert f.metadata["help"] in meaning, key
    for flag in Options.FLAG_SETTINGS:
        assert f"`--{flag}`" in (ROOT / "README.md").read_text()
