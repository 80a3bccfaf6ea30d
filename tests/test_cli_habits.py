"""Issue 16, sections 1, 3, 4 and 6: the CLI as deploying engineers run it (engine-true launch lines, escaped
output, OUT always produced, Hub pre-checks and `awqpad push`, hf-style flags, the header cache, --json
errors, help and start-up) and the Python API. Real checkpoints from tests/factory.py, the fake Hub from
tests/hub_server.py, the real entry point in subprocesses."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factory import Model, Quant, build_checkpoint
from tests.hub_server import READ_TOKEN, TOKEN, HubServer, client_env

ROOT = Path(__file__).resolve().parent.parent
MODEL = Model(hidden=512, heads=8, kv_heads=4)  # heads split 2, 4 and 8 ways on every engine; 16 is blocked
LAUNCH = {  # engine -> its launch line for MODEL at TP 4
    "vllm": "vllm serve {m} --tensor-parallel-size 4",
    "sglang": "python -m sglang.launch_server --model-path {m} --tp 4",
    "lmdeploy": "lmdeploy serve api_server {m} --tp 4",
    "tgi": "text-generation-launcher --model-id {m} --num-shard 4",
    "trtllm": "trtllm-serve {m} --tp_size 4",
}


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "AWQPAD_DEBUG"}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "awqpad", *map(str, args)], capture_output=True, text=True,
                          env=env or base, cwd=ROOT, timeout=180)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("habits") / "[v2]tiny"  # brackets: rich markup must not eat them
    build_checkpoint(path, MODEL, Quant("awq"), shards=2)
    return path


# --- 1. engine-true output, escaping, OUT always -------------------------------------------------


def test_plan_next_lines_name_every_engine_and_keep_brackets(src):
    proc = run("plan", src, "--tp", "4", "--engine", "all")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    out = str(src.parent / f"{src.name}-tp4")
    for line in LAUNCH.values():
        assert line.format(m=f"'{out}'") in text, (line, text)
    assert text.count("vllm serve") == 1  # vllm and vllm-latest share one launch line
    assert f"awqpad pad '{src}' '{out}' --tp 4 --engine all" in text
    assert str(src) in text.splitlines()[0]  # the path keeps its [v2]
    # Rule ids are data, not markup: two failing vllm rules at TP 4 are told apart by their ids.
    assert "[dense-down-groups]" in text and "[dense-down-marlin-k]" in text
    assert not any(line != line.rstrip() for line in text.splitlines())  # piped: no trailing spaces
    summary = json.loads(run("plan", src, "--tp", "4", "-e", "all", "--json").stdout)
    assert [line.split()[0] for line in summary["next"]["launch"]] == ["vllm", "python", "text-generation-launcher",
                                                                        "lmdeploy", "trtllm-serve"]


def test_pad_card_and_next_lines_follow_the_engine(src, tmp_path):
    out = tmp_path / "tiny-sglang-tp4"
    proc = run("pad", src, out, "--tp", "4", "--engine", "sglang")
    assert proc.returncode == 0, proc.stderr
    assert LAUNCH["sglang"].format(m=str(out)) in proc.stdout and "vllm serve" not in proc.stdout
    card = (out / "README.md").read_text()
    assert LAUNCH["sglang"].format(m=f"./{out.name}") in card and "vllm serve" not in card
    assert str(tmp_path) not in card and str(src.parent) not in card  # never a local absolute path
    assert f"`{src.name}`" in card


def test_pad_writes_out_when_nothing_needs_padding(src, tmp_path):
    same_fs = tmp_path / "linked"
    proc = run("pad", src, same_fs, "--tp", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["status"] == "nothing to do" and outcome["out"] == str(same_fs)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert set(shards) <= set(outcome["linked_files"])
    record = json.loads((same_fs / "awqpad.json").read_text())
    assert record["padding_needed"] is False and record["status"] == "nothing to do"
    verify = run("verify", src, same_fs, "--layers", "none")
    assert "awqpad.json" not in verify.stderr or verify.returncode != 70

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to copy across")
    other = Path(os.path.realpath(shm)) / f"awqpad-test-{os.getpid()}"
    try:
        proc = run("pad", src, other, "--tp", "1", "--json")
        assert proc.returncode == 0, proc.stderr
        outcome = json.loads(proc.stdout)
        assert outcome["linked_files"] == [] and set(shards) <= set(outcome["copied_files"])
        for name in shards:
            assert (other / name).read_bytes() == (src / name).read_bytes()
            assert (other / name).stat().st_ino != (src / name).stat().st_ino
    finally:
        subprocess.run(["rm", "-rf", str(other)], check=False)


def test_render_at_80_columns_keeps_ids_and_width(src):
    from rich.console import Console

    import awqpad
    from awqpad.cli.plan_cmd import next_commands, render

    plan = awqpad.plan(str(src), tp=[2, 4], engine="all")
    summary = awqpad.plan_summary(plan)
    summary["next"] = next_commands(plan, str(src))
    console = Console(width=80, file=io.StringIO(), highlight=False)
    render(plan, summary, console)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "[dense-down-groups]" in text and "[dense-down-marlin-k]" in text  # ids whole, not eaten as markup


# --- 3. Hub habits --------------------------------------------------------------------------------

REPO = "org/tiny-awq"


@pytest.fixture(scope="module")
def hub(src, tmp_path_factory):
    plain = tmp_path_factory.mktemp("hubsrc") / "tiny"
    build_checkpoint(plain, MODEL, Quant("awq"), shards=2)
    with HubServer() as server:
        server.main_commit = server.add_repo(REPO, plain)
        server.add_repo("org/private", plain, private=True)
        yield server


@pytest.fixture
def env(hub, tmp_path) -> dict:
    hub.reset()
    return client_env(hub, tmp_path / "hf-home", ROOT)


@pytest.mark.parametrize("case", ["no-token", "read-only", "other-namespace", "offline", "no-network"])
def test_push_to_hub_is_checked_before_padding(src, hub, env, tmp_path, case):
    extra, needle = {
        "no-token": ({}, "hf auth login"),
        "read-only": ({"HF_TOKEN": READ_TOKEN}, "read-only"),
        "other-namespace": ({"HF_TOKEN": TOKEN}, "cannot write to 'someone'"),
        "offline": ({"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
        "no-network": ({"HF_TOKEN": TOKEN, "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub"),
    }[case]
    repo = "someone/x" if case == "other-namespace" else "me/x"
    proc = run("pad", src, tmp_path / "out", "--tp", "4", "--push-to-hub", repo, env={**env, **extra})
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was padded
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert repo not in hub.repos


def test_awqpad_push_resumes(src, hub, env, tmp_path):
    out = tmp_path / "tiny-tp4"
    assert run("pad", src, out, "--tp", "4").returncode == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    # An interrupted earlier push: the first shard made it, nothing else.
    hub.add_repo("me/resume", {shards[0]: (out / shards[0]).read_bytes()}, private=True, message="partial")
    proc = run("push", out, "me/resume", "--json", env={**env, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pushed"].endswith("/me/resume")
    repo = hub.repos["me/resume"]
    messages = list(repo.messages.values())
    assert not any(shards[0] in m for m in messages[1:]) and any(shards[1] in m for m in messages)
    head = repo.head
    for path in out.iterdir():
        if path.name != "README.md":
            assert head[path.name] == path.read_bytes(), path.name
    card = head["README.md"].decode()
    assert LAUNCH["vllm"].format(m="me/resume") in card and f"./{out.name}" not in card
    before = len(repo.commits)
    again = run("push", out, "me/resume", env={**env, "HF_TOKEN": TOKEN})
    assert again.returncode == 0 and len(repo.commits) == before  # nothing left to send: no commit


def test_pad_push_names_the_repo_in_the_card(src, hub, env, tmp_path):
    proc = run("pad", src, tmp_path / "o", "--tp", "4", "-e", "tgi", "--push-to-hub", "me/tgi-tp4", "--token", TOKEN,
               env=env)
    assert proc.returncode == 0, proc.stderr
    card = hub.repos["me/tgi-tp4"].head["README.md"].decode()
    assert LAUNCH["tgi"].format(m="me/tgi-tp4") in card and str(tmp_path) not in card
    assert LAUNCH["tgi"].format(m="me/tgi-tp4") in proc.stdout


def test_hf_style_flags(hub, env, tmp_path):
    a = json.loads(run("plan", REPO, "--tp", "2,4", "--json", env=env).stdout)
    b = json.loads(run("plan", REPO, "--tensor-parallel-size", "4", "--tp", "2", "--json", env=env).stdout)
    assert a["tp"] == b["tp"] == [2, 4] and a["dims"] == b["dims"]
    rev = run("plan", REPO, "--revision", hub.main_commit, "--tp", "4", "--json", env=env)
    assert rev.returncode == 0 and json.loads(rev.stdout)["revision"] == hub.main_commit
    clash = run("plan", f"{REPO}@main", "--revision", "other", "--tp", "4", env=env)
    assert clash.returncode == 2 and "--revision" in clash.stderr
    denied = run("inspect", "org/private", env=env)
    assert denied.returncode == 2 and "hf auth login" in denied.stderr and "HF_TOKEN" in denied.stderr
    assert run("inspect", "org/private", "--token", TOKEN, env=env).returncode == 0
    cache = tmp_path / "elsewhere"
    assert run("inspect", REPO, "--cache-dir", cache, env=env).returncode == 0
    assert list(cache.glob("models--org--tiny-awq/awqpad-headers/*/*.safetensors"))
    assert list(cache.glob("models--org--tiny-awq/snapshots/*/config.json"))
    assert run("plan", "--tp", "x", REPO, env=env).returncode == 2


def test_header_cache_ls_clear_and_bound(hub, env, tmp_path):
    assert run("plan", REPO, "--tp", "4", env=env).returncode == 0
    hub_cache = Path(env["HF_HOME"]) / "hub"
    assert list(hub_cache.glob("models--org--tiny-awq/awqpad-headers/*"))  # under the Hub cache root
    listed = json.loads(run("cache", "ls", "--json", env=env).stdout)
    assert listed["cache_dir"] == str(hub_cache)
    [entry] = listed["entries"]
    assert entry["repo_id"] == REPO and entry["commit"] == hub.main_commit
    assert 0 < entry["bytes_on_disk"] < entry["apparent_bytes"]  # sparse
    # A bound of 0 MB keeps only the entry just written.
    bounded = {**env, "AWQPAD_HEADER_CACHE_MB": "0", "HF_TOKEN": TOKEN}
    assert run("plan", "org/private", "--tp", "4", env=bounded).returncode == 0
    assert [e["repo_id"] for e in json.loads(run("cache", "ls", "--json", env=env).stdout)["entries"]] == ["org/private"]
    cleared = run("cache", "clear", env=env)
    assert cleared.returncode == 0 and "removed 1 entry" in cleared.stdout
    assert json.loads(run("cache", "ls", "--json", env=env).stdout)["entries"] == []


# --- 4. scriptable: API, JSON errors, help -----------------------------------------------------------


def test_public_api(src, tmp_path):
    import awqpad

    report = awqpad.inspect(str(src))
    assert report.format == "awq-gemm" and [r.status for r in report.tp_table][:3] == ["loadable", "needs padding",
                                                                                        "needs padding"]
    plan = awqpad.plan(str(src), tp=4)
    assert plan.needs_padding and not plan.blocked and plan.changed_dims[0].padded == 2560
    outcome = awqpad.pad(str(src), tmp_path / "out", tp=4)
    assert isinstance(outcome, awqpad.PadOutcome) and outcome.status == "padded"
    assert outcome.launch == (LAUNCH["vllm"].format(m=str(tmp_path / "out")),)
    result = awqpad.verify(str(tmp_path / "out"), str(src), layers="none")
    assert result.passed and result.tp == (4,)
    from awqpad.serialize import to_data

    cli = json.loads(run("inspect", src, "--json").stdout)
    assert to_data(report) == cli  # the API returns what --json prints
    with pytest.raises(awqpad.InputError) as info:
        awqpad.plan(str(tmp_path / "missing"), tp=4)
    assert info.value.exit_code == 2
    blocked = awqpad.plan(str(src), tp=16)  # 8 heads cannot split 16 ways
    assert blocked.blocked
    with pytest.raises(awqpad.BlockedError) as info:
        awqpad.pad(str(src), tmp_path / "never", tp=16)
    assert info.value.exit_code == 3 and info.value.data["plan"]["blocked"] and not (tmp_path / "never").exists()
    with pytest.raises(awqpad.OutputError):
        awqpad.pad(str(src), tmp_path / "out", tp=4)  # exists, no force


def test_json_errors(src, tmp_path):
    missing = run("plan", tmp_path / "nope", "--tp", "4", "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout) == {"error": {"code": 2, "message": f"{tmp_path / 'nope'}: no such directory"}}
    assert missing.stderr.strip() == f"awqpad: error: {tmp_path / 'nope'}: no such directory"
    usage = run("plan", src, "--json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["code"] == 2
    blocked = run("pad", src, tmp_path / "o", "--tp", "16", "--json")
    assert blocked.returncode == 3 and len(blocked.stderr.strip().splitlines()) == 1
    data = json.loads(blocked.stdout)
    assert data["error"]["code"] == 3 and data["status"] == "blocked" and data["plan"]["blockers"]
    assert not (tmp_path / "o").exists()


def test_help_shows_real_metavars_and_completion():
    for command in ["", "inspect", "plan", "pad", "verify", "push", "cache", "cache ls"]:
        proc = run(*command.split(), "--help")
        assert proc.returncode == 0, proc.stderr
        assert "{" not in proc.stdout.split("Examples")[0] and "<str>" not in proc.stdout and "<list" not in proc.stdout
        assert not any(line != line.rstrip() for line in proc.stdout.splitlines())
    assert "Usage: awqpad plan [OPTIONS] SRC" in run("plan", "--help").stdout
    assert "--tp, --tensor-parallel-size TP" in run("pad", "--help").stdout
    assert "--install-completion" in run("--help").stdout
    script = run("--show-completion", "bash")
    assert script.returncode == 0 and "_AWQPAD_COMPLETE" in script.stdout


# --- 6. start-up ------------------------------------------------------------------------------------

HEAVY = ("numpy", "huggingface_hub", "rich", "pydantic")


def loaded_after(*args) -> set[str]:
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('LOADED', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
            f"sys.argv = ['awqpad', *{[str(a) for a in args]!r}]\n"
            "from awqpad.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [x for x in proc.stderr.splitlines() if x.startswith("LOADED")][-1]
    return set(line.split()[1:])


def test_startup_imports_stay_lazy(src):
    assert loaded_after("--version") == set()
    assert loaded_after("--help") == set()
    assert loaded_after("plan", "--help") == set()
    assert loaded_after("inspect", src) == {"rich"}  # tables, but no numpy, Hub client or pydantic
    assert loaded_after("inspect", src, "--json") == set()
    proc = subprocess.run([sys.executable, "-c", "import sys, awqpad; print(sorted(m for m in %r if m in sys.modules))"
                           % (HEAVY,)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "[]"


# --- 4. sha256 of every output file, recorded while writing ---------------------------------------


def test_awqpad_json_records_sha256_of_every_file(src, tmp_path):
    import hashlib

    out = tmp_path / "hashed"
    assert run("pad", src, out, "--tp", "4").returncode == 0
    files = json.loads((out / "awqpad.json").read_text())["files"]
    written = {p.name for p in out.iterdir() if p.is_file()} - {"awqpad.json"}
    assert set(files) == written
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert run("verify", out, "--layers", "none").returncode == 0  # verify reads the extended files table
