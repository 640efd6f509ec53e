import json
import os
import types
from pathlib import Path

import pytest
import torch

from viq.config import DrawerConfig, HeadConfig, VAEConfig, ViQConfig, ViTConfig

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "reference-parity"
FIXTURES = FIXTURES.resolve()
#: Why a test that needs the parity fixtures is skipped on a clone without ../shared (CI has it).
MISSING_FIXTURES = (f"needs the reference-parity fixtures, not found at {FIXTURES}: they come with the project's "
                    "shared folder (../shared/fixtures/reference-parity beside the repository, made by running "
                    "the reference code; see its README). The rest of the suite runs without them.")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_config(size: str) -> ViQConfig:
    """The architecture of the parity fixtures, from their model-config.json."""
    mc = json.loads((FIXTURES / "model-config.json").read_text())
    v = mc["vit"]
    return ViQConfig(
        name=f"fixture-{size}",
        vit=ViTConfig(width=v["width"], depth=v["depth"], heads=v["heads"], mlp_hidden=v["mlp_hidden"],
                      patch=v["patch"], pos_grid=v["pos_grid"][0]),
        head=HeadConfig(levels=mc["head"]["levels"][size], fsq_attn_dim=mc["head"]["fsq_block"]["reduced_dim"]),
        drawer=DrawerConfig(vae=VAEConfig(**mc["vae"]["kwargs"])),
    )


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(MISSING_FIXTURES)
    return FIXTURES


def reference_dir_with_config(tmp_path: Path, size: str) -> Path:
    """A copy-free reference-layout directory (symlinks) plus a viq config.json naming the architecture."""
    if not FIXTURES.is_dir():
        pytest.skip(MISSING_FIXTURES)
    src = FIXTURES / f"converted_{size}"
    dst = tmp_path / f"converted_{size}"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(json.dumps({"model": fixture_config(size).model_dump(mode="json")}))
    return dst


# ---- without ../shared: skip what reads the fixtures, run everything else ------------------------

NEEDS_FIXTURES = {"FIXTURES", "fixtures_dir", "reference_dir_with_config", "fixture_config"}


def _names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the lambdas and comprehensions inside it) refers to."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _needy_names(module) -> set[str]:
    """NEEDS_FIXTURES plus the module's globals that lead to the fixtures: paths under them, and
    helpers or fixtures whose code uses such a name (followed until nothing new is found)."""
    needy = set(NEEDS_FIXTURES)
    for name, value in vars(module).items():
        if isinstance(value, Path) and (value == FIXTURES or FIXTURES in value.parents):
            needy.add(name)
    funcs = {}
    for name, value in vars(module).items():
        fn = value._get_wrapped_function() if hasattr(value, "_get_wrapped_function") else value  # a fixture
        fn = getattr(fn, "__wrapped__", fn)
        code = getattr(fn, "__code__", None)
        if isinstance(code, types.CodeType):
            funcs[name] = _names(code) | set(code.co_varnames[:code.co_argcount])
    grew = True
    while grew:
        grew = False
        for name, used in funcs.items():
            if name not in needy and used & needy:
                needy.add(name)
                grew = True
    return needy


def pytest_collection_modifyitems(config, items):
    if FIXTURES.is_dir():
        return
    skip = pytest.mark.skip(reason=MISSING_FIXTURES)
    cache: dict = {}
    for item in items:
        fn = getattr(item, "function", None)
        module = getattr(item, "module", None)
        if fn is None or module is None:
            continue
        if module not in cache:
            cache[module] = _needy_names(module)
        needy = cache[module]
        if (_names(fn.__code__) | set(getattr(item, "fixturenames", ()))) & needy:
            item.add_marker(skip)


def reseal(folder):
    """Record the current sha256 of every part in config.json (a hand-edited but consistent folder)."""
    from viq.weights.io import sha256_file

    meta = json.loads((folder / "config.json").read_text())
    for entry in meta["parts"].values():
        entry["sha256"] = sha256_file(folder / entry["file"])
        entry["bytes"] = (folder / entry["file"]).stat().st_size
    (folder / "config.json").write_text(json.dumps(meta))


def viqctl_in_process(*args, env=None):
    """Run viqctl in this process and return what ``subprocess.run`` would (exit code, stdout, stderr).

    For tests of what a command does: it saves each call the interpreter start and the torch and
    diffusers imports (2-5 s). What only a real process shows (the entry point, signals, pipes,
    the working directory) is tested through subprocesses. An exception escaping the command is the
    traceback a user would see: it comes back as exit 1 with the traceback on stderr.
    """
    import subprocess
    import traceback

    from typer.testing import CliRunner

    from viqctl.__main__ import app, gather_levels

    argv = gather_levels([str(a) for a in args])
    r = CliRunner().invoke(app, argv, env=env)
    stderr, code = r.stderr, r.exit_code
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
        code = 1
    return subprocess.CompletedProcess(argv, code, r.stdout, stderr)
