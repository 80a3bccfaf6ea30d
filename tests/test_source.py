"""resolve_source: local directories unchanged; repo ids through huggingface_hub against a local fake Hub.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it is imported, so every Hub-side
check runs in a fresh interpreter (`_resolve` below) with the environment pointed at the test server.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from awqpad.errors import InputError
from awqpad.source import DOWNLOAD_IGNORE, Source, parse_repo_spec, record_source, resolve_source
from tests.factory import Model, Quant, build_checkpoint
from tests.hub_server import TOKEN, HubServer, client_env, patch_hub_env

REPO = "org/tiny-awq"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny-awq"
    build_checkpoint(path, Model(hidden=512, heads=8, kv_heads=4), Quant("awq"), shards=3)
    # Files a pad from the Hub must not download: pickled duplicates and original/ weights.
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle" * 1000)
    (path / "original").mkdir()
    (path / "original" / "consolidated.00.pth").write_bytes(b"\x80\x02" * 5000)
    (path / "original" / "params.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def hub(ckpt):
    with HubServer() as server:
        server.main_commit = server.add_repo(REPO, ckpt)
        yield server


@pytest.fixture
def hf_env(hub, tmp_path) -> dict:
    hub.reset()
    return client_env(hub, tmp_path / "hf-home", ROOT, HF_HUB_DISABLE_PROGRESS_BARS="1")


def _resolve(env: dict, spec: str, **kwargs) -> dict:
    """resolve_source(spec, **kwargs) in a fresh interpreter; the Source as a dict, or the error."""
    code = textwrap.dedent(f"""
        import json, dataclasses
        from awqpad.errors import AwqpadError
        from awqpad.source import resolve_source
        try:
            s = resolve_source({spec!r}, **{kwargs!r})
            print(json.dumps({{**dataclasses.asdict(s), "root": str(s.root)}}))
        except AwqpadError as e:
            print(json.dumps({{"error": e.message, "exit_code": e.exit_code}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resolve_here(monkeypatch, hub, hf_home: Path, spec: str, *, token: str | None = None, **kwargs) -> dict:
    """resolve_source in this process, huggingface_hub patched onto the fake Hub (see patch_hub_env)."""
    from awqpad.errors import AwqpadError

    patch_hub_env(monkeypatch, hub.url, hf_home, token=token)
    try:
        s = resolve_source(spec, **kwargs)
    except AwqpadError as e:
        return {"error": e.message, "exit_code": e.exit_code}
    return {**dataclasses.asdict(s), "root": str(s.root)}


# --- local directories and spec parsing (no Hub) -----------------------------------------------------


def test_local_directory_unchanged(ckpt):
    src = resolve_source(str(ckpt))
    assert src == Source(ckpt.resolve(), str(ckpt), None)
    assert not src.is_hub and src.fetched_bytes == 0
    assert record_source(src) == {"id": str(ckpt), "revision": None, "hub": False}


def test_local_file_and_missing_path(ckpt, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        resolve_source(str(ckpt / "config.json"))
    with pytest.raises(InputError, match="no such directory"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no such directory"):
        resolve_source("./org/name")


def test_existing_directory_wins_over_repo_id(ckpt, tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(ckpt)
    monkeypatch.chdir(tmp_path)
    src = resolve_source("org/name")
    assert not src.is_hub and src.root == ckpt.resolve()


@pytest.mark.parametrize("spec, expected", [
    ("Qwen/Qwen2-VL-72B-Instruct-AWQ", ("Qwen/Qwen2-VL-72B-Instruct-AWQ", None)),
    ("org/name@main", ("org/name", "main")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/my_model.v2@0123456789abcdef0123456789abcdef01234567", ("org/my_model.v2", "0123456789abcdef0123456789abcdef01234567")),
    ("name-only", None), ("./org/name", None), ("/abs/path", None), ("~/x/y", None), ("a/b/c", None),
])
def test_parse_repo_spec(spec, expected):
    assert parse_repo_spec(spec) == expected


# --- headers only (inspect, plan) ------------------------------------------------------------------


def test_headers_only_fetches_headers_into_sparse_files(hub, hf_env, ckpt):
    got = _resolve(hf_env, REPO, headers_only=True)
    assert "error" not in got, got
    assert got["is_hub"] and got["source_id"] == REPO and got["revision"] == hub.main_commit
    root = Path(got["root"])
    assert root.is_relative_to(Path(hf_env["HF_HOME"]))
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert sorted(p.name for p in root.glob("*.safetensors")) == shards
    for name in shards:
        local, remote = ckpt / name, root / name
        assert remote.stat().st_size == local.stat().st_size  # the remote size, so header checks hold
        n = int.from_bytes(local.read_bytes()[:8], "little")
        assert remote.read_bytes()[: 8 + n] == local.read_bytes()[: 8 + n]
        assert remote.stat().st_blocks * 512 < local.stat().st_size  # sparse: the hole takes no disk
    for name in ("config.json", "model.safetensors.index.json"):
        assert (root / name).read_bytes() == (ckpt / name).read_bytes()
    assert not (root / "pytorch_model.bin").exists()

    shard_bytes = hub.bytes_sent(".safetensors")
    assert 0 < shard_bytes < 64 * 1024
    assert all(rng is not None for m, _, _, rng in hub.requests(".safetensors") if m == "GET")
    assert got["fetched_bytes"] >= shard_bytes


def test_headers_only_reads_like_a_local_directory(hub, hf_env, ckpt):
    code = textwrap.dedent(f"""
        import json
        from awqpad.checkpoint.model import read_checkpoint
        from awqpad.source import resolve_source
        a = read_checkpoint(resolve_source({REPO!r}, headers_only=True))
        b = read_checkpoint(resolve_source({str(ckpt)!r}))
        same = (a.tensors == b.tensors and a.dims == b.dims and a.format == b.format
                and [s.file_size for s in a.shards] == [s.file_size for s in b.shards])
        print(json.dumps({{"same": same, "findings": [f.message for f in a.findings]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=hf_env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["same"]


def test_headers_only_second_run_uses_cache(hub, hf_env):
    first = _resolve(hf_env, REPO, headers_only=True)
    hub.reset()
    second = _resolve(hf_env, REPO, headers_only=True)
    assert second["root"] == first["root"] and second["revision"] == first["revision"]
    assert hub.bytes_sent(".safetensors") == 0
    assert second["fetched_bytes"] == 0


def test_headers_only_offline_after_first_fetch(hub, hf_env):
    online = _resolve(hf_env, f"{REPO}@main", headers_only=True)
    hub.reset()
    offline = _resolve({**hf_env, "HF_HUB_OFFLINE": "1"}, f"{REPO}@main", headers_only=True)
    assert offline["root"] == online["root"] and offline["revision"] == hub.main_commit
    assert hub.requests() == []  # not a single request


def test_offline_never_fetched_is_a_clean_error(hub, hf_env):
    got = _resolve({**hf_env, "HF_HUB_OFFLINE": "1"}, REPO, headers_only=True)
    assert got["exit_code"] == 2 and "HF_HUB_OFFLINE" in got["error"] and REPO in got["error"]
    got = _resolve({**hf_env, "HF_HUB_OFFLINE": "1"}, REPO)
    assert got["exit_code"] == 2 and "HF_HUB_OFFLINE" in got["error"]
    assert hub.requests() == []


def test_offline_pad_after_headers_only_needs_the_weights(hub, hf_env):
    _resolve(hf_env, REPO, headers_only=True)
    got = _resolve({**hf_env, "HF_HUB_OFFLINE": "1"}, REPO)
    assert got["exit_code"] == 2 and "weights are not in the Hugging Face cache" in got["error"], got


# --- full snapshot (pad, verify) --------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_snapshot_equals_local_files_minus_skipped(hub, hf_env, ckpt):
    got = _resolve(hf_env, REPO)
    assert "error" not in got, got
    root = Path(got["root"])
    assert got["revision"] == hub.main_commit == root.name and got["is_hub"]
    assert root.is_relative_to(Path(hf_env["HF_HOME"]) / "hub")  # the normal HF cache
    local = {k: v for k, v in _files(ckpt).items() if k != "pytorch_model.bin" and not k.startswith("original/")}
    assert _files(root) == local
    downloaded = {path.split("/resolve/")[1].split("/", 1)[1] for m, path, _, _ in hub.requests() if m == "GET" and "/resolve/" in path}
    assert "pytorch_model.bin" not in downloaded and not any(p.startswith("original/") for p in downloaded)
    assert "*.bin" in DOWNLOAD_IGNORE and "original/*" in DOWNLOAD_IGNORE

    # ... and then offline, and then headers-only reuse the snapshot without fetching anything.
    hub.reset()
    offline = _resolve({**hf_env, "HF_HUB_OFFLINE": "1"}, REPO)
    assert offline["root"] == got["root"] and hub.requests() == []
    headers = _resolve(hf_env, REPO, headers_only=True)
    assert headers["root"] == got["root"] and hub.bytes_sent(".safetensors") == 0


def test_snapshot_allow_patterns_override(hub, hf_env):
    got = _resolve(hf_env, REPO, allow_patterns=["*.json", "*.safetensors"])
    assert "error" not in got, got
    names = {p.name for p in Path(got["root"]).iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and "README.md" not in names


# --- revisions ---------------------------------------------------------------------------------------


def test_branch_tag_and_commit_resolve_to_commits(hub, tmp_path, monkeypatch, ckpt):
    repo = "org/revisions"
    files = _files(ckpt)
    first = hub.add_repo(repo, files)
    changed = dict(files)
    changed["README.md"] = b"# changed on dev\n"
    dev = hub.add_repo(repo, changed, branch="dev", message="dev commit")
    hub.tag(repo, "v1", first)
    assert first != dev

    def resolve(spec, **kw):
        return _resolve_here(monkeypatch, hub, tmp_path / "hf-home", spec, **kw)

    assert resolve(f"{repo}@dev", headers_only=True)["revision"] == dev
    assert resolve(f"{repo}@v1", headers_only=True)["revision"] == first
    assert resolve(f"{repo}@{first}", headers_only=True)["revision"] == first
    assert resolve(repo, headers_only=True)["revision"] == first
    snap = resolve(f"{repo}@dev")
    assert snap["revision"] == dev and (Path(snap["root"]) / "README.md").read_bytes() == b"# changed on dev\n"
    bad = resolve(f"{repo}@nope", headers_only=True)
    assert bad["exit_code"] == 2 and "revision 'nope' not found" in bad["error"]


# --- access -------------------------------------------------------------------------------------------


def test_private_repo_needs_token(hub, tmp_path, monkeypatch, ckpt):
    hub.add_repo("org/private", _files(ckpt), private=True)
    denied = _resolve_here(monkeypatch, hub, tmp_path / "a", "org/private", headers_only=True)
    assert denied["exit_code"] == 2 and "HF_TOKEN" in denied["error"] and "org/private" in denied["error"]
    ok = _resolve_here(monkeypatch, hub, tmp_path / "b", "org/private", headers_only=True, token=TOKEN)
    assert "error" not in ok and ok["is_hub"]
    ok = _resolve_here(monkeypatch, hub, tmp_path / "b", "org/private", token=TOKEN)
    assert "error" not in ok and ok["is_hub"]


def test_gated_repo_message(hub, tmp_path, monkeypatch, ckpt):
    hub.add_repo("org/gated", _files(ckpt), gated=True)
    for kwargs in ({"headers_only": True}, {}):
        got = _resolve_here(monkeypatch, hub, tmp_path / "hf-home", "org/gated", **kwargs)
        assert got["exit_code"] == 2 and "gated" in got["error"] and "HF_TOKEN" in got["error"], got


def test_pickle_only_repo_is_refused_by_name(hub, tmp_path, monkeypatch, ckpt):
    files = {k: v for k, v in _files(ckpt).items() if not k.endswith((".safetensors", ".safetensors.index.json"))}
    hub.add_repo("org/pickles", files)  # config.json + pytorch_model.bin (+ original/)
    from awqpad.checkpoint.model import read_checkpoint

    headers = _resolve_here(monkeypatch, hub, tmp_path / "hf-home", "org/pickles", headers_only=True)
    assert "error" not in headers, headers
    with pytest.raises(InputError, match="only pickled weights"):  # inspect/plan: read_checkpoint says it
        read_checkpoint(Source(Path(headers["root"]), "org/pickles", headers["revision"], True))
    assert hub.bytes_sent("pytorch_model.bin") == 0
    got = _resolve_here(monkeypatch, hub, tmp_path / "hf-home", "org/pickles")  # pad: before any weights
    assert got["exit_code"] == 2 and "only pickled weights (pytorch_model.bin)" in got["error"], got
    assert hub.bytes_sent("pytorch_model.bin") == 0
