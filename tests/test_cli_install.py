"""The three design-card commands, verbatim, from another directory, through the installed entry point:
after a non-editable `pip install .` (built here into a temp target, offline) and after `pip install -e .`
(the environment the tests run in)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """viq installed from a copy of the source tree, as `pip install .` does (no network, no deps)."""
    pytest.importorskip("setuptools", reason="building the package needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    top = {".git", ".venv", "build", "runs", "data", "out", ".pytest_cache"}  # at the top only: viq/data is code

    def skip(folder, names):
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (Path(folder) == ROOT and n in top)]

    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    target = tmp / "target"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"pip install . failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    shutil.rmtree(src)  # nothing may come from the source tree any more
    installed = {p.relative_to(target).as_posix() for p in (target / "viq").rglob("*.py")}
    assert {"viq/data/synthetic.py", "viq/train/recipe/catalog.py"} <= installed
    assert sorted(p.name for p in (target / "viq" / "recipes").glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert not (target / "viq" / "recipes").is_symlink()  # real copies in the wheel
    return target


def installs(wheel_install):
    editable = shutil.which("viqctl")
    yield "pip install .", [str(wheel_install / "bin" / "viqctl")], {"PYTHONPATH": str(wheel_install)}
    if editable is not None:
        yield "pip install -e .", [editable], {}


def test_design_card_commands_work_verbatim_from_another_directory(wheel_install, tmp_path):
    for label, exe, extra in installs(wheel_install):
        work = tmp_path / label.replace(" ", "_")
        (work / "images").mkdir(parents=True)
        Image.new("RGB", (40, 24), (200, 30, 30)).save(work / "images" / "a.png")
        env = {**os.environ, **extra, "HOME": str(work), "VIQ_MODELS_DIR": str(work / "models"),
               "HF_HUB_OFFLINE": "1"}

        def run(*args):
            return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=work, env=env, timeout=300)

        where = run("--version")
        assert where.returncode == 0 and where.stdout.startswith("viq "), (label, where.stderr)
        if extra:  # the installed copy runs, not the repository
            probe = subprocess.run([sys.executable, "-c", "import viq; print(viq.__file__)"], capture_output=True,
                                   text=True, cwd=work, env=env)
            assert probe.stdout.strip().startswith(extra["PYTHONPATH"]), (label, probe.stdout)

        # 1. viqctl train --recipe fsq16k.yaml: the shipped recipe; without weights, what to download
        p = run("train", "--recipe", "fsq16k.yaml", "--print-config")
        assert p.returncode == 0 and "name: fsq16k" in p.stdout, (label, p.stderr)
        p = run("train", "--recipe", "fsq16k.yaml")
        assert p.returncode == 2 and "viqctl download" in p.stderr and "recipe not found" not in p.stderr, \
            (label, p.stderr)
        p = run("train", "--recipe", "fsq16k.yaml", "--stage", "2-1", "--print-config")  # [--stage 2-1]
        assert p.returncode == 0 and "stage: 2-1" in p.stdout and "passthrough" in p.stdout, (label, p.stderr)
        p = run("recipes")
        assert p.returncode == 0 and len(p.stdout.splitlines()) >= 10, (label, p.stderr)

        # 2. viqctl encode images/: codes go to ./codes, and the same command again resumes
        p = run("encode", "images/")
        assert p.returncode == 0, (label, p.stderr)
        assert f"codes -> {work / 'codes'}" in p.stderr and (work / "codes" / "manifest.json").is_file()
        p = run("encode", "images/", "--json")
        assert p.returncode == 0 and '"skipped": 1' in p.stdout, (label, p.stdout)

        # 3. viqctl bench --seq 16k: says what it runs and how long, then Ctrl-C keeps what finished
        proc = subprocess.Popen([*exe, "bench", "--seq", "16k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=work, env=env)
        said = []
        deadline = time.time() + 120
        for line in proc.stderr:
            said.append(line)
            if line.startswith("plan:") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=180)
        text = "".join(said) + rest
        assert proc.returncode == 130, (label, text)
        assert "seq 16k (16384) tokens" in said[0] and "1 CPU thread" in said[0], (label, text)
        assert "each 1 warm-up + 5 timed step(s)" in said[1] and "rough estimate" in said[1], (label, text)
        assert "interrupted" in rest and "Traceback" not in rest, (label, text)
