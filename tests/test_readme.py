"""The README's main command works as written, through the installed ``viqctl`` entry point."""

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_main_command() -> str:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("```bash")
    for line in lines[start + 1:]:
        if line.startswith("python3 -m venv") and "viqctl" in line:
            return line
    raise AssertionError("the README's first code block has no main command")


def test_readme_main_command_encodes_and_reconstructs(tmp_path):
    exe = shutil.which("viqctl")
    if exe is None:
        pytest.fail("the viqctl console script is not installed: pip install -e . should provide it")
    # the set-up steps already ran (this is the venv they made); run the viqctl steps, writing under tmp
    steps = [s.strip() for s in readme_main_command().split("&&") if s.strip().startswith("viqctl ")]
    assert [s.split()[1] for s in steps] == ["encode", "reconstruct"]
    for step in steps:
        args = step.replace("out/", f"{tmp_path}/").split()[1:]
        p = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "bundled demo model" in p.stderr  # each command says which model it runs
    photos = sorted(p.stem for p in (ROOT / "viq/assets/examples").iterdir() if p.suffix.lower() in {".jpg", ".png"})
    drawn = sorted(tmp_path.joinpath("recon").glob("**/*.png"))
    assert len(drawn) == len(photos) >= 3
    for png in drawn:
        with Image.open(png) as im:
            assert im.mode == "RGB" and min(im.size) >= 16


def test_readme_and_bench_help_state_the_same_cpu_run():
    """Run time and repeats of the CPU default bench: --help, README and the defaults agree."""
    import re
    import sys

    from viq.bench import BenchConfig

    cfg = BenchConfig(device="cpu").resolved()
    p = subprocess.run([sys.executable, "-m", "viqctl", "bench", "--help"], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "COLUMNS": "400"})
    helptext = " ".join(p.stdout.split())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    steps = f"{cfg.warmup} warm-up + {cfg.repeats} timed steps"
    assert steps in helptext and steps in readme
    assert re.search(r"6 configurations.*about a minute", helptext) and "about a minute on an idle 2-core" in readme
    assert f"Timed steps per setup (default {cfg.repeats})" in helptext
