"""Downloads by name without the network: a local folder stands in for each Hub repo."""

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
from typer.testing import CliRunner

from viq import hub
from viq.errors import HubError


def _never(*a, **k):
    raise AssertionError("a test reached the real Hub")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Guard: the hub is offline and its entry points explode unless a test installs a fake."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _never)
    monkeypatch.setattr(huggingface_hub, "HfApi", _never)


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class FakeHub:
    """Repos as local folders; ``snapshot_download`` copies what the patterns allow, skipping done files."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []
        self.fail_after = None  # copy this many files, then drop the connection

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "__")

    def add(self, repo_id: str, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            write(self.repo(repo_id) / rel, data)

    def _files(self, repo_id):
        base = self.repo(repo_id)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kw):
        self.calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        if not self.repo(repo_id).exists():
            exc = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(exc, f"404 {repo_id}")
            raise exc
        copied = 0
        for rel in self._files(repo_id):
            if allow_patterns and not any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                continue
            dest = Path(local_dir) / rel
            if dest.exists():
                continue
            if self.fail_after is not None and copied >= self.fail_after:
                write(Path(local_dir) / ".cache/huggingface/download" / (rel + ".incomplete"), b"par")
                raise ConnectionError("connection reset by peer")
            write(dest, (self.repo(repo_id) / rel).read_bytes())
            # as huggingface_hub: a finished file replaces its .incomplete
            (Path(local_dir) / ".cache/huggingface/download" / (rel + ".incomplete")).unlink(missing_ok=True)
            copied += 1
        return str(local_dir)

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        base = self.repo(repo_id)
        sibs = [SimpleNamespace(rfilename=f, size=(base / f).stat().st_size) for f in self._files(repo_id)]
        return SimpleNamespace(sha="0123abcd", siblings=sibs)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    f = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", f.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: f)
    f.add(hub.VIQ_REPO, {
        "converted_16k/model_viq_fsq_16k.pth": b"enc16", "converted_16k/embedder.pth": b"emb",
        "converted_16k/index_drawer.pth": b"draw", "converted_2k/model_viq_fsq_2k.pth": b"enc2",
        "converted_2k/embedder.pth": b"emb", "converted_2k/index_drawer.pth": b"draw",
        "anyres_vit/giant1b/siglip2_g_anyres_s4.pth": b"vit", "README.md": b"readme",
    })
    f.add("Qwen/Qwen-Image", {"vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"v" * 10,
                              "transformer/huge.safetensors": b"t" * 100, "model_index.json": b"{}"})
    return f


@pytest.fixture
def models(tmp_path) -> Path:
    return tmp_path / "models"


# ------------------------------------------------------------------ plans


def test_plan_patterns_and_folders(models):
    p = hub.plan_download("viq-16k", models)
    assert p.repo_id == "XuminYu/ViQ_weights" and p.folder == models / "ViQ_weights"
    assert p.allow_patterns == ("converted_16k/*", "*/converted_16k/*") and p.revision == "main"
    assert hub.plan_download("qwen-image-vae", models).allow_patterns == ("vae/*",)
    assert hub.plan_download("siglip2-g", models).folder.name == "siglip2_g_384_16"
    assert hub.plan_download("siglip2-so400m", models).folder.name == "siglip2_so400m_384_16"
    assert hub.plan_download("qwen2.5-0.5b", models).repo_id == "Qwen/Qwen2.5-0.5B"
    assert hub.plan_download("qwen2.5-7b-instruct", models).folder.name == "Qwen2.5-7B-Instruct"
    assert "anyres_vit/giant1b/siglip2_g_anyres_s4.pth" in hub.plan_download("viq-anyres-vit-g", models).allow_patterns
    custom = hub.plan_download("org/some-repo", models, revision="v1", include=["*.json"])
    assert (custom.folder.name, custom.revision, custom.allow_patterns) == ("some-repo", "v1", ("*.json",))
    assert {e.kind for e in hub.KNOWN_MODELS.values()} == {"vit", "llm", "vae", "viq"}
    with pytest.raises(HubError, match="unknown model name 'viq-3k'"):
        hub.plan_download("viq-3k", models)
    with pytest.raises(HubError, match="already belongs to Qwen/Qwen-Image"):
        hub.plan_download("someone/Qwen-Image", models)


def test_default_models_dir():
    assert hub.default_models_dir() == Path.home() / ".cache" / "viq" / "models"
    assert hub.default_models_dir("~/m") == Path.home() / "m"


# ------------------------------------------------------------------ download, registry, resolve


@pytest.mark.parametrize("prefix", ["", "ViQ/"])
def test_download_places_registers_and_resolves(fake, models, prefix):
    if prefix:  # the repo may keep the sizes under one folder
        shutil.move(fake.repo(hub.VIQ_REPO) / "converted_16k", fake.repo(hub.VIQ_REPO) / "ViQ" / "converted_16k")
    res = hub.download(hub.plan_download("viq-16k", models), offline=False)
    target = models / "ViQ_weights" / prefix / "converted_16k"
    assert res.status == "downloaded" and res.path == target
    assert res.next_step == f"viqctl verify {target}"
    assert not (models / "ViQ_weights" / "converted_2k").exists()  # only the asked size came down
    reg = json.loads((models / "registry.json").read_text())["models"]["viq-16k"]
    assert reg["repo_id"] == hub.VIQ_REPO and reg["revision"] == "main" and reg["path"].endswith("converted_16k")
    assert sorted(reg["files"]) == sorted(f"{prefix}converted_16k/{n}" for n in
                                          ("model_viq_fsq_16k.pth", "embedder.pth", "index_drawer.pth"))
    assert hub.resolve_model("viq-16k", models) == target
    assert hub.resolve_model(str(target), models) == target  # a path is returned as is
    with pytest.raises(HubError, match=r"viq-2k is not downloaded.*viqctl download viq-2k"):
        hub.resolve_model("viq-2k", models)
    with pytest.raises(HubError, match="'nonsense'"):
        hub.resolve_model("nonsense", models)


def test_vae_only_and_file_target(fake, models):
    res = hub.download(hub.plan_download("qwen-image-vae", models), offline=False)
    assert res.path == models / "Qwen-Image" / "vae"
    assert not (models / "Qwen-Image" / "transformer").exists()
    vit = hub.download(hub.plan_download("viq-anyres-vit-g", models), offline=False)
    assert vit.path.is_file() and vit.path.name == "siglip2_g_anyres_s4.pth"
    assert hub.resolve_model("viq-anyres-vit-g", models) == vit.path
    rows = {r.name: r for r in hub.list_models(models)}
    assert rows["qwen-image-vae"].present and rows["viq-anyres-vit-g"].present and not rows["viq-16k"].present


def test_resume_after_interrupted_transfer(fake, models):
    plan = hub.plan_download("viq-16k", models)
    fake.fail_after = 1
    with pytest.raises(HubError, match=r"viq-16k: cannot reach the Hub.*missing in .*converted_16k/"):
        hub.download(plan, offline=False)
    assert not (models / "registry.json").exists()  # nothing registered from a partial transfer
    assert hub.missing_files(plan)  # the partial folder is not mistaken for a complete one
    fake.fail_after = None
    res = hub.download(plan, offline=False)
    assert len(fake.calls) == 2 and hub.missing_files(plan) == []
    assert "viq-16k" in hub.load_registry(models) and res.path.name == "converted_16k"


def test_custom_repo_with_a_partial_file_is_not_complete(models):
    plan = hub.plan_download("someorg/some-model", models, include=["*.safetensors"])
    folder = plan.folder
    write(folder / "a.safetensors")
    assert hub.missing_files(plan) == []
    write(folder / ".cache/huggingface/download/b.safetensors.incomplete", b"par")
    assert hub.missing_files(plan) == ["huggingface/download/b.safetensors.incomplete (partial transfer)"]
    (folder / ".cache/huggingface/download/b.safetensors.incomplete").unlink()
    write(folder / "model.safetensors.index.json", json.dumps({"weight_map": {"x": "c.safetensors"}}).encode())
    assert hub.missing_files(plan) == ["c.safetensors"]  # a shard the index names is still missing


def test_sharded_llm_needs_every_shard(models):
    plan = hub.plan_download("qwen2.5-7b", models)
    folder = plan.folder
    write(folder / "config.json", b"{}")
    write(folder / "model.safetensors.index.json",
          json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                     "b": "model-00002-of-00002.safetensors"}}).encode())
    write(folder / "model-00001-of-00002.safetensors")
    assert hub.missing_files(plan) == ["model-00002-of-00002.safetensors"]
    write(folder / "model-00002-of-00002.safetensors")
    assert hub.missing_files(plan) == []


# ------------------------------------------------------------------ offline and errors


def test_offline_says_what_is_missing_and_how(models):
    plan = hub.plan_download("viq-16k", models)
    for offline in (True, None):  # None follows huggingface_hub's HF_HUB_OFFLINE (set by the guard)
        with pytest.raises(HubError) as info:
            hub.download(plan, offline=offline)
        msg = str(info.value)
        assert msg.startswith("viq-16k: offline") and "converted_16k/model_viq_fsq_16k.pth" in msg
        assert "viqctl download --import PATH --name viq-16k" in msg
    with pytest.raises(HubError, match="dry-run needs the Hub"):
        hub.dry_run(plan, offline=True)


@pytest.mark.parametrize("exc", [LocalEntryNotFoundError("no local files"), OfflineModeIsEnabled("offline")])
def test_hub_offline_exceptions_become_hub_errors(monkeypatch, models, exc):
    def raising(*a, **k):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising)
    with pytest.raises(HubError, match=r"^siglip2-g: cannot reach the Hub.*open_clip_config.json"):
        hub.download(hub.plan_download("siglip2-g", models), offline=False)


def test_missing_repo_and_empty_match(fake, models):
    with pytest.raises(HubError, match="repo not found"):
        hub.download(hub.plan_download("org/absent", models), offline=False)
    with pytest.raises(HubError, match="has no files matching nothing-\\*"):
        hub.download(hub.plan_download(hub.VIQ_REPO, models, include=["nothing-*"]), offline=False)
    assert not (models / "registry.json").exists()


def test_offline_registers_a_complete_local_copy(models):
    plan = hub.plan_download("siglip2-g", models)
    write(plan.folder / "open_clip_config.json", b"{}")
    write(plan.folder / "open_clip_pytorch_model.bin", b"w")  # the .bin twin is accepted too
    res = hub.download(plan, offline=True)
    assert res.status == "present" and res.path == plan.folder
    assert hub.resolve_model("siglip2-g", models) == plan.folder


def test_corrupt_registry_is_a_clear_error(models):
    write(models / "registry.json", b"{not json")
    with pytest.raises(HubError, match="registry.json"):
        hub.resolve_model("viq-16k", models)


# ------------------------------------------------------------------ dry run


def test_dry_run_lists_files_and_bytes(fake, models):
    plan = hub.plan_download("viq-16k", models)
    write(plan.folder / "converted_16k" / "embedder.pth", b"emb")  # already here, same size
    d = hub.dry_run(plan, offline=False)
    assert [f.path for f in d.files] == ["converted_16k/embedder.pth", "converted_16k/index_drawer.pth",
                                         "converted_16k/model_viq_fsq_16k.pth"]
    assert d.total_bytes == 3 + 4 + 5 and d.missing_bytes == 4 + 5 and d.commit == "0123abcd"
    assert fake.calls == []  # nothing downloaded


# ------------------------------------------------------------------ import


def reference_dir(tmp_path: Path, size="16k") -> Path:
    d = tmp_path / "mine" / f"converted_{size}"
    for n in (f"model_viq_fsq_{size}.pth", "embedder.pth", "index_drawer.pth"):
        write(d / n, n.encode())
    return d


@pytest.mark.parametrize("link", [False, True])
def test_import_known_name(tmp_path, models, link):
    src = reference_dir(tmp_path)
    res = hub.import_weights(src, "viq-16k", models, link=link)
    dest = models / "ViQ_weights" / "converted_16k"
    assert res.status == "imported" and res.path == dest and dest.is_symlink() == link
    assert (dest / "embedder.pth").read_bytes() == b"embedder.pth"
    assert hub.resolve_model("viq-16k", models) == dest
    reg = hub.load_registry(models)["viq-16k"]
    assert reg["source"] == str(src) and reg["linked"] == link and len(reg["files"]) == 3
    with pytest.raises(HubError, match="already exists"):
        hub.import_weights(reference_dir(tmp_path / "other"), "viq-16k", models)


def test_import_parent_folder_and_validation(tmp_path, models):
    src = reference_dir(tmp_path, "2k")
    assert hub.import_weights(src.parent, "viq-2k", models).path == models / "ViQ_weights" / "converted_2k"
    (src / "embedder.pth").unlink()
    with pytest.raises(HubError, match="does not hold viq-2k"):
        hub.import_weights(src, "viq-2k", models / "b")
    own = write(tmp_path / "ckpt" / "vision_tower.pth")
    res = hub.import_weights(own, "my-run", models)
    assert res.path == models / "my-run" / "vision_tower.pth"
    assert hub.resolve_model("my-run", models) == res.path


# ------------------------------------------------------------------ CLI


def cli(*args, **env):
    from viqctl.__main__ import app

    return CliRunner().invoke(app, ["download", *args], env=env or None)


def test_cli_help_shows_an_example():
    r = cli("--help")
    assert r.exit_code == 0 and "Example: viqctl download" in r.stdout


def test_cli_list_json(fake, models):
    hub.download(hub.plan_download("viq-16k", models), offline=False)
    r = cli("--list", "--json", VIQ_MODELS_DIR=str(models))
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["viq-16k"]["present"] and not rows["viq-2k"]["present"]
    assert rows["qwen-image-vae"]["allow_patterns"] == ["vae/*"] and rows["qwen2.5-0.5b"]["size_bytes"]


def test_cli_download_partial_failure_and_usage_errors(fake, models, monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    r = cli("viq-16k", "org/absent", "--dir", str(models), "--json")
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert [x["name"] for x in out["results"]] == ["viq-16k"] and out["failed"][0]["name"] == "org/absent"
    assert out["results"][0]["next_step"].startswith("viqctl verify ")
    assert cli("viq-3k", "--dir", str(models)).exit_code == 2
    assert cli("--dir", str(models)).exit_code == 2
    assert cli("viq-16k", "--name", "x", "--dir", str(models)).exit_code == 2
    r = cli("viq-16k", "--dry-run", "--json", "--dir", str(models))
    assert r.exit_code == 0 and json.loads(r.stdout)["dry_run"][0]["missing_bytes"] == 0


def test_cli_offline_and_import(tmp_path, models):
    r = cli("viq-16k", "--offline", "--dir", str(models))
    assert r.exit_code == 1 and "viqctl download --import" in r.stderr.replace("\n", " ")
    r = cli("--import", str(reference_dir(tmp_path)), "--name", "viq-16k", "--dir", str(models), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["status"] == "imported"
    assert cli("--import", str(tmp_path), "--dir", str(models)).exit_code == 2  # --name missing


def test_import_in_place_just_registers(fake, models):
    """Weights fetched by hand straight into the models dir (e.g. `hf download --local-dir`) are registered."""
    target = models / "ViQ_weights" / "converted_16k"
    for n in ("model_viq_fsq_16k.pth", "embedder.pth", "index_drawer.pth"):
        write(target / n)
    assert hub.import_weights(target, "viq-16k", models).path == target
    assert hub.load_registry(models)["viq-16k"]["revision"] == "local"


# ------------------------------------------------------------------ progress as lines


def test_cli_download_says_what_it_fetches_then_a_line_per_file(fake, models, monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    r = cli("viq-16k", "--dir", str(models))  # CliRunner's stderr is not a terminal: lines, not bars
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if "fetching" in line)
    assert lines[first] == (f"viq-16k: {hub.VIQ_REPO}@main -> {models / 'ViQ_weights'}: fetching 3 file(s), 12 B")
    got = [line for line in lines if line.startswith("viq-16k: got ")]
    assert sorted(line.split()[2] for line in got) == [
        "converted_16k/embedder.pth", "converted_16k/index_drawer.pth", "converted_16k/model_viq_fsq_16k.pth"]
    assert any("converted_16k/model_viq_fsq_16k.pth (5 B)" in line for line in got)
    assert "3/3 files, 12 B of 12 B (100%)" in got[-1]
    assert any(line.startswith("viq-16k: fetched 3 file(s), 12 B in ") for line in lines[first:])
    r = cli("viq-16k", "--dir", str(models))  # a rerun has nothing to fetch and says so
    assert r.exit_code == 0 and "all 3 file(s) already here" in r.stderr and " got " not in r.stderr


def test_download_progress_names_the_interrupted_transfer(fake, models):
    plan = hub.plan_download("viq-16k", models)
    fake.fail_after = 2
    said = []
    with pytest.raises(HubError):
        hub.download(plan, offline=False, say=said.append, file_lines=True)
    assert said[0].endswith("fetching 3 file(s), 12 B")
    assert sum(" got " in s for s in said) == 2
    assert said[-1] == "viq-16k: stopped after 2 of 3 file(s); partial files are kept and the next run resumes them"
    said.clear()
    hub.download(plan, offline=False, say=said.append)  # say without file_lines: the plan line only
    assert said == [f"viq-16k: {hub.VIQ_REPO}@main -> {plan.folder}: fetching 1 file(s), 5 B (2 already here)"]


def test_download_watch_lines_from_the_folder(tmp_path):
    from viq.hub_progress import PARTIAL_DIR, DownloadWatch, plan_line

    files = [hub.RemoteFile("a.bin", 2000, False), hub.RemoteFile("sub/b.bin", 3000, False),
             hub.RemoteFile("c.json", 10, True)]
    assert plan_line("m", "org/m@main", tmp_path, files).endswith("fetching 2 file(s), 5.0 KB (1 already here)")
    assert "size unknown" in plan_line("m", "org/m@main", tmp_path, [hub.RemoteFile("x", None, False)])
    now = [0.0]
    said = []
    watch = DownloadWatch("m", tmp_path, files, said.append, every_s=10, clock=lambda: now[0])
    assert watch.poll() == []  # nothing yet, and not time for a status line
    write(tmp_path / PARTIAL_DIR / "xyz.etag.incomplete", b"p" * 1500)
    now[0] = 11
    assert watch.poll() == ["m: downloading [0/2 files, 1.5 KB of 5.0 KB (30%), 11 s]"]
    write(tmp_path / "a.bin", b"a" * 1999)  # not yet its size: not done
    now[0] = 12
    assert watch.poll() == []
    write(tmp_path / "a.bin", b"a" * 2000)
    (tmp_path / PARTIAL_DIR / "xyz.etag.incomplete").unlink()
    assert watch.poll() == ["m: got a.bin (2.0 KB) [1/2 files, 2.0 KB of 5.0 KB (40%), 12 s]"]
    assert watch.poll() == []  # each file once
    write(tmp_path / "sub/b.bin", b"b" * 3000)
    with watch:  # the closing look catches what landed, then a summary line
        pass
    assert said[-2:] == ["m: got sub/b.bin (3.0 KB) [2/2 files, 5.0 KB of 5.0 KB (100%), 12 s]",
                         "m: fetched 2 file(s), 5.0 KB in 12.0 s"]
