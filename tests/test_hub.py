"""The CLI on repo ids, and push_to_hub, against a local fake Hub (tests/hub_server.py): no network, no mocks.

Asserts what the issue asks: inspect/plan on a repo id fetch only safetensors headers (bytes counted by
the server), pad from a repo id equals pad from the local directory, push uploads exactly OUT's files
with the source linked, and every Hub failure is one line with exit 2 (reading) or 4 (pushing).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from awqpad.source.push import model_card, source_line
from tests.factory import Model, Quant, build_checkpoint
from tests.hub_server import TOKEN, HubServer, client_env, patch_hub_env

REPO = "org/tiny-awq"
ROOT = Path(__file__).resolve().parent.parent
HEADER_BUDGET = 64 * 1024


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny-awq"
    build_checkpoint(path, Model(hidden=512, heads=8, kv_heads=4), Quant("awq"), shards=3)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle" * 1000)  # a pickled duplicate pad must skip
    return path


@pytest.fixture(scope="module")
def hub(ckpt):
    with HubServer() as server:
        server.main_commit = server.add_repo(REPO, ckpt)
        server.add_repo("org/private", ckpt, private=True)
        server.add_repo("org/gated", ckpt, gated=True)
        server.add_repo("org/busy", ckpt)
        server.repos["org/busy"].rate_limited = True
        yield server


@pytest.fixture
def env(hub, tmp_path) -> dict:
    hub.reset()
    return client_env(hub, tmp_path / "hf-home", ROOT)


def awqpad(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def assert_one_line_error(proc, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("awqpad: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def shard_bytes(hub: HubServer) -> int:
    return hub.bytes_sent(".safetensors")


def no_full_shard_get(hub: HubServer) -> bool:
    return all(status == 206 and rng for m, _, status, rng in hub.requests(".safetensors") if m == "GET")


def checkpoint_size(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


# --- inspect / plan read headers only --------------------------------------------------------------


def test_inspect_repo_id_fetches_only_headers(hub, env, ckpt):
    assert checkpoint_size(ckpt) > 3_000_000  # a multi-MB checkpoint ...
    proc = awqpad(env, "inspect", REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    sent = shard_bytes(hub)
    assert 0 < sent < HEADER_BUDGET and no_full_shard_get(hub)  # ... of which only the headers travel
    remote = json.loads(proc.stdout)
    assert remote["source"] == REPO and remote["revision"] == hub.main_commit
    local = json.loads(awqpad(env, "inspect", ckpt, "--json").stdout)
    for key in ("source", "revision"):
        remote.pop(key), local.pop(key)
    remote.pop("fetched_bytes", None), local.pop("fetched_bytes", None)
    assert remote == local

    # Offline afterwards: the same answer from the cache, without a single request.
    hub.reset()
    proc = awqpad({**env, "HF_HUB_OFFLINE": "1"}, "inspect", REPO, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["revision"] == hub.main_commit and hub.requests() == []


def test_plan_on_a_41_gb_repo_costs_kilobytes(hub, env, tmp_path_factory):
    """A Qwen2-72B-Instruct-AWQ-shaped repo (11 sparse shards, 41 GB): plan fetches the index and headers."""
    big = tmp_path_factory.mktemp("big") / "qwen2-72b-awq"
    build_checkpoint(big, Model(hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, head_dim=128,
                                vocab=152064), Quant("awq"), shards=11, data=False)
    assert checkpoint_size(big) > 40e9
    hub.add_repo("org/qwen2-72b-awq", big, lazy=True)
    hub.reset()
    proc = awqpad(env, "plan", "org/qwen2-72b-awq", "--tp", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    headers = sum(8 + int.from_bytes(p.open("rb").read(8), "little") for p in big.glob("*.safetensors"))
    assert no_full_shard_get(hub) and headers <= shard_bytes(hub) < 2 * headers  # ~260 KB of 41 GB
    gets = [r for r in hub.requests(".safetensors") if r[0] == "GET"]
    assert len(gets) == 11  # one Range request per shard: the index's tensor names size the probe
    total = hub.bytes_sent()  # everything: API answers, config, index, headers
    assert total < 1_000_000
    local = json.loads(awqpad(env, "plan", big, "--tp", "4", "--json").stdout)
    assert json.loads(proc.stdout)["dims"] == local["dims"]


def test_plan_repo_id_tp4_fetches_only_headers(hub, env, ckpt):
    proc = awqpad(env, "plan", REPO, "--tp", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert 0 < shard_bytes(hub) < HEADER_BUDGET and no_full_shard_get(hub)
    remote = json.loads(proc.stdout)
    assert remote["needs_padding"] and not remote["blocked"] and remote["revision"] == hub.main_commit
    assert remote["next"]["pad"].startswith(f"awqpad pad {REPO} ")
    local = json.loads(awqpad(env, "plan", ckpt, "--tp", "4", "--json").stdout)
    assert remote["dims"] == local["dims"]

    hub.reset()  # planning again costs no shard bytes: the headers are cached per commit
    again = awqpad(env, "plan", REPO, "--tp", "4")
    assert again.returncode == 0 and shard_bytes(hub) == 0, again.stderr
    assert REPO in again.stdout and f"awqpad pad {REPO} " in again.stdout


# --- clean errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here


ERROR_CASES = {  # case -> (SRC, extra environment, what the one line must say)
    "missing": ("org/does-not-exist", {}, ["org/does-not-exist", "not found"]),
    "revision": (f"{REPO}@no-such-branch", {}, ["no-such-branch", "not found"]),
    "private": ("org/private", {}, ["org/private", "HF_TOKEN"]),
    "bad-token": ("org/private", {"HF_TOKEN": "hf_wrong"}, ["org/private", "HF_TOKEN"]),
    "gated": ("org/gated", {}, ["org/gated", "gated", "HF_TOKEN"]),
    "rate-limited": ("org/busy", {}, ["org/busy", "rate limited"]),
    "no-network": (REPO, {"HF_ENDPOINT": "DEAD"}, [REPO, "cannot reach the Hub", "HF_HUB_OFFLINE=1"]),
    "offline": (REPO, {"HF_HUB_OFFLINE": "1"}, [REPO, "HF_HUB_OFFLINE"]),
}


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real entry point (`awqpad.cli.main`) in this process: (exit code, stdout, stderr)."""
    from awqpad.cli import main

    monkeypatch.setattr(sys, "argv", ["awqpad", *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(ERROR_CASES))
@pytest.mark.parametrize("command", [["plan", "--tp", "4"], ["pad", "--tp", "4"], ["inspect"]])
def test_hub_errors_are_one_line(hub, tmp_path, dead_endpoint, monkeypatch, capsys, command, case):
    """In-process (the environment is patched into huggingface_hub.constants, see patch_hub_env), so the
    whole matrix takes a second; the subprocess tests above cover the environment handling itself."""
    spec, extra, needles = ERROR_CASES[case]
    endpoint = dead_endpoint if extra.get("HF_ENDPOINT") == "DEAD" else hub.url
    patch_hub_env(monkeypatch, endpoint, tmp_path / "hf-home", offline="HF_HUB_OFFLINE" in extra,
                  token=extra.get("HF_TOKEN"))
    out = tmp_path / "out"
    code, stdout, stderr = run_main(monkeypatch, capsys, command[0], spec, *([out] if command[0] == "pad" else []),
                                    *command[1:])
    assert_one_line_error(subprocess.CompletedProcess([], code, stdout, stderr), 2, *needles)
    assert not out.exists()


def test_private_repo_with_token(hub, env):
    proc = awqpad({**env, "HF_TOKEN": TOKEN}, "plan", "org/private", "--tp", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(hub) < HEADER_BUDGET


# --- pad from a repo id ---------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def padded(hub, ckpt, tmp_path_factory):
    """pad from the repo id and from the local directory, same TP."""
    work = tmp_path_factory.mktemp("pad")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(work / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    hub.reset()
    remote = awqpad(env, "pad", REPO, work / "from-hub", "--tp", "2", "--json")
    assert remote.returncode == 0, remote.stderr
    assert "Fetching" not in remote.stderr  # no library progress bars when stderr is not a terminal
    downloaded = [path for m, path, _, _ in hub.requests() if m == "GET" and "/resolve/" in path]
    local = awqpad(env, "pad", ckpt, work / "from-dir", "--tp", "2", "--json")
    assert local.returncode == 0, local.stderr
    return work / "from-hub", work / "from-dir", json.loads(remote.stdout), downloaded


def test_pad_from_repo_id_equals_pad_from_directory(padded, hub):
    from_hub, from_dir, summary, downloaded = padded
    a, b = _files(from_hub), _files(from_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith((".safetensors", ".json")) and name != "awqpad.json":
            assert a[name] == b[name], name
    assert summary["revision"] == hub.main_commit
    prov = json.loads(a["awqpad.json"])["source"]
    assert prov["id"] == REPO and prov["revision"] == hub.main_commit and prov["hub"] is True
    assert prov["layout_sha256"] == json.loads(b["awqpad.json"])["source"]["layout_sha256"]
    assert not any(p.endswith("pytorch_model.bin") for p in downloaded)


# --- push -------------------------------------------------------------------------------------------


def _push(env: dict, out: Path, repo: str, **kwargs) -> dict:
    code = textwrap.dedent(f"""
        import json
        from awqpad.errors import AwqpadError
        from awqpad.source.push import push_to_hub
        try:
            print(json.dumps({{"url": push_to_hub({str(out)!r}, {repo!r}, **{kwargs!r})}}))
        except AwqpadError as e:
            print(json.dumps({{"error": e.message, "exit_code": e.exit_code}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_push_creates_private_repo_with_out_files(padded, hub, env):
    out = padded[0]
    got = _push({**env, "HF_TOKEN": TOKEN}, out, "me/tiny-awq-tp2")
    assert got == {"url": f"{hub.url}/me/tiny-awq-tp2"}, got
    repo = hub.repos["me/tiny-awq-tp2"]
    assert repo.private
    remote = repo.head
    local = _files(out)
    assert set(remote) - {".gitattributes"} == set(local)
    for name, data in local.items():
        if name != "README.md":
            assert remote[name] == data, name
    card = remote["README.md"].decode()
    written = local["README.md"].decode()
    assert "base_model: test/tiny-qwen2" in written  # the factory's card names its own base model ...
    # ... the pushed card is pad's card with base_model pointing at the source repo, plus the source line.
    assert written.replace("base_model: test/tiny-qwen2", f"base_model: {REPO}").rstrip() in card
    assert card.rstrip().endswith(f"Source: [{REPO}]({hub.url}/{REPO}) @ [`{hub.main_commit}`]"
                                  f"({hub.url}/{REPO}/tree/{hub.main_commit})")
    assert (out / "README.md").read_bytes() == local["README.md"]  # OUT itself untouched
    assert awqpad(env, "inspect", "me/tiny-awq-tp2").returncode == 2  # private: anonymous read denied

    # Pushing again to the existing repo is fine (exist_ok) and, with nothing changed, adds no files.
    again = _push({**env, "HF_TOKEN": TOKEN}, out, "me/tiny-awq-tp2", private=False)
    assert "url" in again and hub.repos["me/tiny-awq-tp2"].head == remote


def test_push_public_and_roundtrip(padded, hub, env):
    got = _push({**env, "HF_TOKEN": TOKEN}, padded[0], "me/public-tp2", private=False)
    assert "url" in got and not hub.repos["me/public-tp2"].private
    proc = awqpad(env, "plan", "me/public-tp2", "--tp", "2", "--json")  # the pushed repo plans as already padded
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["needs_padding"] is False


@pytest.mark.parametrize("case", ["no-token", "bad-token", "bad-repo-id", "no-network", "not-a-dir", "offline"])
def test_push_errors_are_one_line(padded, hub, dead_endpoint, tmp_path, monkeypatch, case):
    from awqpad.errors import AwqpadError
    from awqpad.source.push import push_to_hub

    out, repo, token, endpoint, offline, code, needle = {
        "no-token": (padded[0], "me/x", None, hub.url, False, 4, "set HF_TOKEN to a token with write access"),
        "bad-token": (padded[0], "me/x", "hf_wrong", hub.url, False, 4, "rejected the token"),
        "bad-repo-id": (padded[0], "not a repo", TOKEN, hub.url, False, 2, "ORG/NAME"),
        "no-network": (padded[0], "me/x", TOKEN, dead_endpoint, False, 4, "cannot reach the Hub"),
        "not-a-dir": (tmp_path / "missing", "me/x", TOKEN, hub.url, False, 2, "not a directory"),
        "offline": (padded[0], "me/x", TOKEN, hub.url, True, 4, "HF_HUB_OFFLINE"),
    }[case]
    patch_hub_env(monkeypatch, endpoint, tmp_path / "hf-home", token=token, offline=offline)
    with pytest.raises(AwqpadError) as info:
        push_to_hub(out, repo)
    assert info.value.exit_code == code and needle in info.value.message and "\n" not in info.value.message
    assert "me/x" not in hub.repos


def test_model_card_helpers():
    assert source_line("org/a", "abc", True).startswith("Source: [org/a](")
    assert source_line("/home/me/ckpt", None, False) == "Source: a local checkpoint directory (`ckpt`)."
    assert source_line(None, None, False) is None
    card = model_card("---\nlicense: mit\nbase_model: Qwen/Qwen2-7B\nbase_model_relation: quantized\n---\n# T\n",
                      "me/t", "org/a", "abc", True)
    assert "base_model: org/a" in card and "license: mit" in card and "base_model_relation" not in card
    assert card.rstrip().endswith(source_line("org/a", "abc", True))
    local = model_card("# T\n", "me/t", "/x/ckpt", None, False)
    assert "base_model" not in local and local.endswith("(`ckpt`).\n")


def test_pad_push_to_hub_end_to_end(hub, env, tmp_path):
    if "--push-to-hub" not in awqpad(env, "pad", "--help").stdout:
        pytest.skip("`awqpad pad --push-to-hub` is not wired into the CLI yet")
    proc = awqpad({**env, "HF_TOKEN": TOKEN}, "pad", REPO, tmp_path / "out", "--tp", "4", "--push-to-hub", "me/tiny-tp4")
    assert proc.returncode == 0, proc.stderr
    repo = hub.repos["me/tiny-tp4"]
    assert repo.private
    assert set(repo.head) - {".gitattributes"} == set(_files(tmp_path / "out"))
