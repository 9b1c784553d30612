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


def test_configuration_reference_is_the_config_tree():
    """The README's table is exactly what the config tree says: every
    setting, its type, default, environment variable, flag and meaning."""
    from ntonix.config import all_settings, reference_table

    text = (ROOT / "README.md").read_text()
    assert reference_table() in text
    for key, _ in all_settings():
        assert text.count(f"| `{key}` |") == 1, key


def test_every_flag_is_a_setting_and_documented():
    from ntonix.config import all_settings
    from ntonix.tap import Options

    keys = {k for k, _ in all_settings()}
    text = (ROOT / "README.md").read_text()
    for flag, key in Options.FLAG_SETTINGS.items():
        assert key in keys and f"`--{flag}`" in text


def test_readme_config_example_loads_with_workers_as_a_number(tmp_path):
    """The README's example file (the JSON block with a "server" section)
    is a configuration the gateway takes, server.workers a JSON number."""
    import json

    from ntonix.config import load

    text = (ROOT / "README.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    examples = [b for b in blocks if "server" in b]
    assert examples, "no example configuration with a server section in the README"
    for doc in examples:
        workers = doc["server"]["workers"]
        assert isinstance(workers, int) and not isinstance(workers, bool)
        path = tmp_path / "example.json"
        path.write_text(json.dumps(doc))
        cfg = load({}, {}, str(path))
        assert cfg.server.workers == str(workers) and cfg.backends
    shipped = json.loads((ROOT / "config" / "ntonix.json").read_text())
    assert isinstance(shipped["server"]["workers"], int) and "threads" not in shipped["server"]
