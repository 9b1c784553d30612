"""Installing: an editable install must give `twistd ntonix` too (twistd finds
plugins by scanning sys.path for twisted/plugins, which an import hook would
hide), and the mock must import from it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_editable_install_finds_the_plugin_and_the_mock(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("ntonix", "mock", "twisted"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "ntonix_mock").symlink_to("mock")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "VIRTUAL_ENV"))}
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", str(src)], env=env,
                   check=True, timeout=600, capture_output=True)
    # From another directory, so the source tree is not on sys.path by accident.
    out = subprocess.run([str(venv / "bin" / "twistd"), "ntonix", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--backend" in out.stdout, out.stdout + out.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import ntonix, ntonix_mock; print(ntonix.__file__, "
                            "ntonix_mock.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0
    assert str(src / "ntonix") in where.stdout and str(src / "ntonix_mock") in where.stdout
