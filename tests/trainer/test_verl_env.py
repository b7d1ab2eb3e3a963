"""The verl adapter's tests in the environment verl needs.

verl 0.9.x declares ``transformers>=5.5.3,<5.11``, while the rest of the project (TRL 1.x)
is tested with a newer transformers, so verl cannot live in the main test environment.
This test builds a second one the way a user would: a venv that sees the main
environment's packages (``--system-site-packages``: torch, triton, ...), then
``pip install -e ".[verl]"``, letting pip's resolver pick verl 0.9.x and a transformers in
its range. It then runs the verl tests there; any failure or skip among them fails here.

The venv is kept under ``$RAL_VERL_ENV`` (default ``~/.cache/ral_kernels/verl-env``) and
rebuilt when the ``[verl]`` extra in pyproject.toml changes, so only the first run pays
for the install (a few minutes).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
VERL_TESTS = ["tests/trainer/test_verl_adapter.py", "tests/trainer/test_verl_ray.py",
              "tests/trainer/test_verl_qwen2_vl.py"]

pytestmark = pytest.mark.skipif(os.environ.get("RAL_IN_VERL_ENV") == "1", reason="already inside the verl env")


def _extra_hash() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^verl = .*$", text, re.M).group(0)
    return hashlib.sha256((line + sys.version).encode()).hexdigest()[:16]


def _env_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RAL_VERL_ENV", pathlib.Path.home() / ".cache" / "ral_kernels" / "verl-env"))


def _python(env: pathlib.Path) -> pathlib.Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / "python"


def _build(env: pathlib.Path) -> pathlib.Path:
    marker = env / "ral-verl-extra.txt"
    if marker.exists() and marker.read_text() == _extra_hash():
        return _python(env)
    venv.EnvBuilder(system_site_packages=True, clear=True, with_pip=True).create(env)
    py = _python(env)
    cmd = [str(py), "-m", "pip", "install", "-e", ".[verl]"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAL_SKIP_CUDA_BUILD": "1"}, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    marker.write_text(_extra_hash())
    return py


def _version(py, package: str) -> str:
    out = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_verl_extra_installs_with_verl_and_its_tests_pass():
    from packaging.version import Version

    py = _build(_env_dir())
    verl_v, tf_v = Version(_version(py, "verl")), Version(_version(py, "transformers"))
    assert Version("0.9") <= verl_v < Version("0.10")
    assert Version("5.5.3") <= tf_v < Version("5.11")  # verl's own range, chosen by pip's resolver
    env = {**os.environ, "RAL_IN_VERL_ENV": "1"}
    env.pop("PYTHONPATH", None)  # the editable install of this checkout, as a user has it
    res = subprocess.run([str(py), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *VERL_TESTS], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, out[-3000:]
