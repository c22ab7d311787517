"""The ``shrinkflow`` CLI as one way in (issue 16): exit codes that mean the
same everywhere (the enum, each command's --help and docs/exit-codes.md
agree), --params and --debug on every command, plain --help, --params never
losing an uncommitted params.yaml, nothing done at import, and each stage
command bootstrapping its environment before Prefect is imported."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import EXIT_CODES, Session, adopt_params, app
from shrinkflow.errors import ExitCode
from tests.conftest import PROJECT_ROOT, bare_project

DOC = PROJECT_ROOT / "docs" / "exit-codes.md"
COMMANDS = typer.main.get_command(app).commands


def cli(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)




def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


# ------------------------------------------------------------ exit codes
def test_the_exit_code_table_is_the_enum():
    rows = table_rows(DOC.read_text(), "| code | name |")
    assert [(int(r[0]), r[1]) for r in rows] == [(int(c), c.name.lower()) for c in ExitCode]


def test_every_command_documents_the_codes_it_declares():
    rows = table_rows(DOC.read_text(), "| command | code |")
    documented: dict[str, set[int]] = {}
    for command, code, _ in rows:
        documented.setdefault(command, set()).add(int(code))
    declared = {name: {int(c) for c in codes} for name, codes in EXIT_CODES.items()}
    assert documented == declared
    assert set(declared) == set(COMMANDS)  # every command, and no other
    for name, codes in declared.items():
        assert {ExitCode.USAGE, ExitCode.CRASH} <= codes, name  # bad params and crashes happen anywhere


def test_each_command_exits_only_with_its_declared_codes():
    """Every ``typer.Exit`` in the CLI is given an ExitCode member, never a
    number, and each command's body uses only the codes it declares."""
    tree = ast.parse((PROJECT_ROOT / "flows" / "cli.py").read_text())
    for node in ast.walk(tree):
        call = getattr(node, "func", None)
        if isinstance(node, ast.Call) and ("Exit" in (getattr(call, "attr", None), getattr(call, "id", None))
                                           or getattr(call, "id", None) == "_fail"):
            arg = node.args[0] if node.args else None
            ok = isinstance(arg, (ast.Attribute, ast.IfExp)) or ast.unparse(node) == "typer.Exit(code)"  # in _fail
            assert ok, ast.unparse(node)
    checked = 0
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        names = [d.args[0].value for d in fn.decorator_list
                 if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "_command"]
        if not names:
            continue
        used = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "ExitCode"}
        assert used <= {c.name for c in EXIT_CODES[names[0]]}, (names[0], used)
        checked += 1
    assert checked == len(COMMANDS)


def test_help_lists_each_commands_codes_in_plain_text():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], terminal_width=100)
    assert top.exit_code == 0 and "<bool>" not in top.output and "╭" not in top.output
    for name in COMMANDS:
        out = runner.invoke(app, [name, "--help"], terminal_width=100)
        assert out.exit_code == 0, (name, out.output)
        text = out.output
        assert "<bool>" not in text and "╭" not in text, text
        assert "--params FILE" in text and "--debug" in text, text
        assert all(len(line) <= 100 for line in text.splitlines()), text
        listed = re.findall(r"^    (\d) (\w+) ", text, re.M)
        assert [(int(c), n) for c, n in listed] == [(int(c), c.name.lower()) for c in sorted(EXIT_CODES[name])]
        # a description is one paragraph, not broken after each source line
        first = text.split("\n\n")[1]
        assert "\n" not in first.strip() or all(len(line) > 60 for line in first.splitlines()[:-1]), first


# ------------------------------------------------------------ one way in
def test_outside_a_project_every_command_exits_usage(tmp_path):
    out = cli(tmp_path, "versions")
    assert out.returncode == ExitCode.USAGE and "not inside a shrinkflow project" in out.stderr


def test_every_command_takes_params_from_the_given_file(tmp_path):
    root = bare_project(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("registry_dir: registry",
                                                                        "registry_dir: elsewhere", 1))
    assert "registry_dir: elsewhere" in other.read_text()
    out = cli(root, "rollback", "--params", str(other))
    assert out.returncode == ExitCode.NOTHING and "elsewhere" in out.stderr, out.stderr
    assert (root / "params.yaml").read_text() == (PROJECT_ROOT / "params.yaml").read_text()  # read, not copied


def test_a_crash_is_one_line_and_debug_prints_its_traceback(tmp_path):
    root = bare_project(tmp_path)
    (root / "registry").mkdir()
    (root / "registry" / "aliases.json").write_text("[]")  # not a mapping: an unusable registry
    out = cli(root, "status")
    assert out.returncode == ExitCode.CRASH and "not a mapping" in out.stderr
    assert "Traceback" not in out.stderr and "--debug" in out.stderr
    out = cli(root, "status", "--debug")
    assert out.returncode == ExitCode.CRASH and "Traceback (most recent call last)" in out.stderr
    assert "RegistryError" in out.stderr


@pytest.mark.parametrize("patch, code, says", [
    # Ctrl-C in the middle of a command: not Click's exit 1 ("refused" here)
    ("Registry.describe_versions = lambda self: (_ for _ in ()).throw(KeyboardInterrupt())",
     ExitCode.INTERRUPTED, ""),
    # a bug in the CLI's own code, outside any command's guard: a traceback, exit 3
    ("cli.find_root = lambda start=None: {}['no such key']", ExitCode.CRASH, "Traceback (most recent call last)"),
])
def test_interrupts_and_bugs_in_the_cli_get_their_own_codes(tmp_path, patch, code, says):
    root = bare_project(tmp_path)
    script = ("import sys\nfrom shrinkflow.registry import Registry\nimport flows.cli as cli\n"
              f"{patch}\nsys.argv = ['shrinkflow', 'versions']\ncli.main()\n")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code and says in proc.stderr, proc.stderr


def test_rollback_with_one_version_says_there_is_nothing_to_roll_back_to(tmp_path):
    from shrinkflow.registry import Registry
    from tests.test_registry import PASS, model_dir

    root = bare_project(tmp_path)
    Registry(root / "registry").promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    out = cli(root, "rollback")
    assert out.returncode == ExitCode.NOTHING, out.stderr
    assert "v0001 is the only version" in out.stderr and "nothing to roll back to" in out.stderr
    assert "--to" not in out.stderr


@pytest.mark.parametrize("version, says", [
    ("nosuch", "'nosuch' is not a version name (vNNNN)"),   # a newcomer's: exit 3 and a traceback
    ("v1", "'v1' is not a version name (vNNNN)"),
    ("../v0001", "'../v0001' is not a version name (vNNNN)"),
    ("v0099", "no version 'v0099'"),
])
def test_window_of_a_version_that_is_not_there_is_bad_usage_in_one_line(tmp_path, version, says):
    from shrinkflow.registry import Registry
    from tests.test_registry import PASS, model_dir

    root = bare_project(tmp_path)
    Registry(root / "registry").promote(model_dir(tmp_path, "m1", b"one"), PASS, {})
    out = cli(root, "window", version, "--out", str(tmp_path / "w.txt"))
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert out.stderr.startswith("error: ") and says in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert '"' not in out.stderr and not (tmp_path / "w.txt").exists()


def test_monitor_with_nothing_in_production_says_so_and_starts_nothing(tmp_path):
    """A newcomer's finding: in a fresh clone `monitor` answered "the
    prediction log is empty" (exit 0) after starting a Prefect server; it is
    "nothing in production", exit 4, as serve and rollback say it."""
    root = bare_project(tmp_path)
    out = cli(root, "monitor", "--report-only")
    assert out.returncode == ExitCode.NOTHING, out.stderr
    assert "nothing to monitor" in out.stderr and "nothing in production" in out.stderr
    assert "shrinkflow run" in out.stderr and "Starting temporary server" not in out.stdout + out.stderr
    assert not (root / "monitoring").exists() and not (root / ".shrinkflow").exists()


# ------------------------------------------------------------ --params FILE
def git(root: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture()
def repo(tmp_path) -> Path:
    root = bare_project(tmp_path)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def session(root: Path, params: Path) -> Session:
    from shrinkflow.config import load_params

    return Session(root, params.resolve(), load_params(params))


def other_params(tmp_path: Path) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("seed: 0", "seed: 7", 1))
    assert path.read_text() != (PROJECT_ROOT / "params.yaml").read_text()
    return path


def test_params_replaces_a_committed_params_yaml_without_a_copy(repo, tmp_path, capsys):
    other = other_params(tmp_path)
    adopt_params(session(repo, other))
    assert (repo / "params.yaml").read_bytes() == other.read_bytes()
    assert not (repo / ".shrinkflow" / "params.previous.yaml").exists()  # git holds the previous one
    assert "git diff params.yaml" in capsys.readouterr().out
    assert "seed: 7" in git(repo, "diff", "params.yaml")


def test_params_refuses_to_overwrite_uncommitted_changes(repo, tmp_path, capsys):
    edited = (repo / "params.yaml").read_text() + "\n# my edit\n"
    (repo / "params.yaml").write_text(edited)
    with pytest.raises(typer.Exit) as info:
        adopt_params(session(repo, other_params(tmp_path)))
    assert info.value.exit_code == ExitCode.USAGE
    assert (repo / "params.yaml").read_text() == edited
    assert "uncommitted changes" in capsys.readouterr().err
    git(repo, "add", "params.yaml")  # staged is still uncommitted
    with pytest.raises(typer.Exit):
        adopt_params(session(repo, other_params(tmp_path)))
    assert (repo / "params.yaml").read_text() == edited


def test_chained_params_runs_replace_their_own_copy_but_never_an_edit(repo, tmp_path, capsys):
    """`run --params A` then `run --params B` (a newcomer's finding: B was
    refused for "uncommitted changes" that were A's copy)."""
    first = other_params(tmp_path)
    second = tmp_path / "second.yaml"
    second.write_text(first.read_text().replace("seed: 7", "seed: 8", 1))
    adopt_params(session(repo, first))
    capsys.readouterr()
    adopt_params(session(repo, second))                  # A's own copy: replaced, A still holds it
    assert (repo / "params.yaml").read_bytes() == second.read_bytes()
    assert f"the copy of {first.resolve()}" in capsys.readouterr().out
    assert not (repo / ".shrinkflow" / "params.previous.yaml").exists()
    second.write_text(second.read_text() + "\n# changed after its copy\n")
    adopt_params(session(repo, first))                   # B's copy, which B no longer holds: kept
    kept = (repo / ".shrinkflow" / "params.previous.yaml").read_text()
    assert "seed: 8" in kept and "changed after" not in kept
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# my edit\n")
    with pytest.raises(typer.Exit) as info:              # an edit of the user's: refused as before
        adopt_params(session(repo, second))
    assert info.value.exit_code == ExitCode.USAGE and "# my edit" in (repo / "params.yaml").read_text()


def test_params_outside_git_keeps_one_copy_and_the_same_file_changes_nothing(tmp_path):
    root = bare_project(tmp_path)
    before = (root / "params.yaml").read_bytes()
    adopt_params(session(root, root / "params.yaml"))
    same = tmp_path / "same.yaml"
    same.write_bytes(before)
    adopt_params(session(root, same))
    assert not (root / ".shrinkflow").exists()
    other = other_params(tmp_path)
    adopt_params(session(root, other))
    assert (root / "params.yaml").read_bytes() == other.read_bytes()
    assert (root / ".shrinkflow" / "params.previous.yaml").read_bytes() == before


def test_run_with_params_refuses_before_anything_starts(repo, tmp_path):
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# my edit\n")
    out = cli(repo, "run", "--params", str(other_params(tmp_path)))
    assert out.returncode == ExitCode.USAGE and "uncommitted changes" in out.stderr
    assert sorted(p.name for p in repo.iterdir()) == [".git", "dvc.yaml", "params.yaml"]  # no .prefect/


def test_params_file_that_leaves_out_tracked_keys_gets_their_defaults_in_the_copy(repo, tmp_path, capsys):
    """params/reuters.yaml, written before data.feedback_heldout_fraction
    existed, made DVC refuse the data stage ("Parameters ... are missing")."""
    from tests.test_tracked_params import dvc_missing, without

    short = tmp_path / "short.yaml"
    short.write_text(without(other_params(tmp_path).read_text(), "feedback_heldout_fraction"))
    adopt_params(session(repo, short))
    copy = (repo / "params.yaml").read_text()
    assert copy != short.read_text() and short.read_text() == without(copy, "feedback_heldout_fraction",
                                                                       "# default, written by shrinkflow")
    out = capsys.readouterr().out
    assert "replaced by" in out and "data.feedback_heldout_fraction: 0.3" in out
    assert session(repo, repo / "params.yaml").params == session(repo, short).params
    assert dvc_missing(repo) == []
    adopt_params(session(repo, short))          # the same file again: nothing to do
    assert capsys.readouterr().out == "" and (repo / "params.yaml").read_text() == copy
    second = other_params(tmp_path)             # its copy is no edit of the user's: replaced
    second.write_text(second.read_text().replace("seed: 7", "seed: 9", 1))
    adopt_params(session(repo, second))
    assert (repo / "params.yaml").read_bytes() == second.read_bytes()
    assert f"the copy of {short.resolve()}" in capsys.readouterr().out


def test_run_refuses_a_params_yaml_that_leaves_out_a_tracked_key_before_anything_starts(repo):
    from tests.test_tracked_params import without

    (repo / "params.yaml").write_text(without((repo / "params.yaml").read_text(), "feedback_heldout_fraction"))
    git(repo, "commit", "-qam", "a params.yaml of an older shrinkflow")
    out = cli(repo, "run")
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert "data.feedback_heldout_fraction (tracked by stage data)" in out.stderr
    assert "feedback_heldout_fraction: 0.3" in out.stderr
    assert sorted(p.name for p in repo.iterdir()) == [".git", "dvc.yaml", "params.yaml"]  # no .prefect/
    assert "feedback_heldout_fraction" not in (repo / "params.yaml").read_text()  # never rewritten


def test_a_second_run_while_one_holds_the_project_changes_nothing_and_names_it(repo, tmp_path):
    """A newcomer's finding: `run --params B` started while `run --params A`
    ran copied B over params.yaml at once; A failed on the changed params,
    B on DVC's lock. The second is refused before it writes anything,
    naming the first; once the first process ends (however it ends: the
    lock is the OS's), the project is free again."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import json, os, sys, time\n"
         "from pathlib import Path\n"
         "from flows.cli import Session, hold_project\n"
         "hold_project(Session(Path('.').resolve(), None, None), 'shrinkflow run --params A')\n"
         "print('held', flush=True)\n"
         "time.sleep(120)\n"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (repo / "params.yaml").read_bytes()
        for args in (("run", "--params", str(other_params(tmp_path))), ("monitor",)):
            out = cli(repo, *args)
            assert out.returncode == ExitCode.USAGE, out.stderr
            assert f"`shrinkflow run --params A` (pid {holder.pid}, since " in out.stderr, out.stderr
            assert "is changing this project" in out.stderr and "nothing was started or changed" in out.stderr
            assert (repo / "params.yaml").read_bytes() == before
            assert not (repo / ".prefect").exists()
        assert cli(repo, "monitor", "--report-only").returncode == ExitCode.NOTHING   # reading needs no lock
        # A helper's finding: --report-only --params copied the file over
        # params.yaml without the lock, under a running lifecycle's stages.
        out = cli(repo, "monitor", "--report-only", "--params", str(other_params(tmp_path)))
        assert out.returncode == ExitCode.NOTHING, out.stderr
        assert "params.yaml replaced" not in out.stdout + out.stderr
        assert (repo / "params.yaml").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    out = cli(repo, "monitor")                    # the holder was killed: its lock went with it
    assert out.returncode == ExitCode.NOTHING, out.stderr


# ------------------------------------------------------- nothing at import
def test_importing_the_flows_and_the_cli_changes_no_environment(tmp_path):
    """The old flows/__init__.py set os.environ at import, differently in and
    outside a project. Now only an entry point's explicit bootstrap does."""
    root = bare_project(tmp_path)
    code = ("import os; before = dict(os.environ)\n"
            "import flows, flows.cli, flows.prefect_server, flows.lifecycle, flows.monitor\n"
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
            "print(changed)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK", "HF_"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_stage_command_bootstraps_before_prefect_is_imported():
    """Run each dvc.yaml stage command's module as DVC does, with the
    bootstrap replaced by a probe: it must be called, and before anything
    imported Prefect (whose settings are fixed at import)."""
    import yaml

    modules = [s["cmd"].split()[2] for s in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values()]
    code = """
import runpy, sys
import shrinkflow.bootstrap as entry

def probe(project_dir, environ=None):
    raise SystemExit("prefect" if any(m.split(".")[0] == "prefect" for m in sys.modules) else "clean")

entry.configure_env = probe
for module in sys.argv[1:]:
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        print(module, "never bootstrapped")
    except SystemExit as exc:
        print(module, exc.code)
"""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *modules], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"{m} clean" for m in modules], proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------ monitor links
def test_the_monitor_links_reports_where_they_are(tmp_path):
    """To the server when one answers at serve.host/port, else to the files."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from shrinkflow.traffic import server_url
    from tasks.monitor import reports_link_base

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        assert server_url("0.0.0.0", port) == f"http://127.0.0.1:{port}"
        assert server_url("::", 8000) == "http://[::1]:8000"
        assert reports_link_base(server_url("0.0.0.0", port)) == f"http://127.0.0.1:{port}/reports"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert reports_link_base(f"http://127.0.0.1:{port}", timeout_s=1) is None  # nobody answers now


def test_the_run_summary_names_stale_baselines_only_when_train_ran_and_dvc_can_tell(tmp_path, monkeypatch):
    """`shrinkflow run`'s last lines say when small_direct and frontier went
    stale (train rebuilt the teacher they read; the e2e lifecycle test sees
    the line). Train skipped: nothing, and DVC is not asked. DVC failing
    (here: no DVC repo, so `dvc status` exits non-zero): nothing either, and
    the summary does not fail."""
    from flows.cli import _baselines_note
    from shrinkflow.dvcrun import stale_stages

    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    with pytest.raises(RuntimeError, match=r"dvc status --json small_direct frontier failed"):
        stale_stages(["small_direct", "frontier"], not_a_repo)
    assert _baselines_note(not_a_repo, {"stages": {"train": {"status": "ran"}}}) == []
    # skipped: DVC is not asked at all
    def asked(*args):
        raise AssertionError("DVC was asked although train was skipped")

    monkeypatch.setattr("shrinkflow.dvcrun.stale_stages", asked)
    assert _baselines_note(not_a_repo, {"stages": {"train": {"status": "skipped"}}}) == []
    with pytest.raises(AssertionError):
        _baselines_note(not_a_repo, {"stages": {"train": {"status": "ran"}}})


def test_the_run_summary_says_what_to_commit_by_top_folder(tmp_path):
    """The tracked files a run changed, by top folder (git status); nothing
    outside git or when nothing changed. The e2e lifecycle test sees it
    after a real run."""
    from flows.cli import _commit_hint

    assert _commit_hint(tmp_path) == []                     # not a git repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    for rel in ("dvc.lock", "metrics/a.json", "metrics/b.json", "notes.txt"):
        (tmp_path / rel).write_text("0\n")
    subprocess.run(git + ["add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert _commit_hint(tmp_path) == []                     # nothing changed
    for rel in ("dvc.lock", "metrics/a.json", "metrics/b.json"):
        (tmp_path / rel).write_text("1\n")
    (tmp_path / "untracked.txt").write_text("x\n")          # untracked files are not named
    (line,) = _commit_hint(tmp_path)
    assert line.startswith("to version this run: git add dvc.lock metrics && git commit (3 tracked files changed")


def test_an_earlier_params_file_made_invalid_since_does_not_block_the_next(repo, tmp_path, capsys):
    """A helper's finding: `run --params A`, A edited into invalid params,
    then `run --params B` exited 2 blaming A."""
    from tests.test_tracked_params import without

    first = tmp_path / "a.yaml"
    first.write_text(without(other_params(tmp_path).read_text(), "feedback_heldout_fraction"))
    adopt_params(session(repo, first))
    copy = (repo / "params.yaml").read_bytes()
    first.write_text(first.read_text().replace("val_fraction: 0.", "val_fraction: 7", 1))
    second = tmp_path / "b.yaml"
    second.write_text(other_params(tmp_path).read_text().replace("seed: 7", "seed: 9", 1))
    adopt_params(session(repo, second))
    assert (repo / "params.yaml").read_bytes() == second.read_bytes()
    assert (repo / ".shrinkflow" / "params.previous.yaml").read_bytes() == copy   # A's copy kept aside


def test_an_interrupt_wrapped_by_library_code_exits_as_an_interrupt_not_a_crash():
    """Seen in the suite: SIGTERM (raised as KeyboardInterrupt) landed inside
    pydantic's serializer, which re-raised it as PydanticSerializationError
    "... KeyboardInterrupt: "; `run` said "could not run" and exited 3."""
    from flows.cli import _SIGNALLED, _crash, _interrupted

    assert not _SIGNALLED
    wrapped = RuntimeError("Error calling function `_ser_model`: KeyboardInterrupt: ")
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("a task failed")
    except ValueError as exc:
        chained = exc
    assert _interrupted(wrapped) and _interrupted(chained)
    assert not _interrupted(RuntimeError("DVC could not reproduce stage 'data'"))
    assert isinstance(_crash(wrapped, "the lifecycle", debug=False), KeyboardInterrupt)
    _SIGNALLED.append(15)                  # a stop signal arrived: whatever broke after it is the interrupt
    try:
        assert _interrupted(RuntimeError("connection reset"))
    finally:
        _SIGNALLED.clear()


def test_a_run_stopped_after_its_deploy_moved_production_says_so(tmp_path, capsys):
    """A helper's finding: SIGTERM during deploy exited 130, "stopped before
    it finished", while production had moved, and nothing said so."""
    from types import SimpleNamespace

    from flows.cli import _production_alias, _say_if_production_moved
    from shrinkflow.config import Params
    from tests.registry_outputs import build

    build(tmp_path / "registry", "v0003")
    s = SimpleNamespace(root=tmp_path, params=Params())
    assert _production_alias(s) == "v0003"
    _say_if_production_moved(s, "v0003")                # nothing moved: nothing said
    assert capsys.readouterr().err == ""
    _say_if_production_moved(s, "v0002")
    err = capsys.readouterr().err
    assert err.startswith("note: production moved to v0003 (from v0002) before the run stopped")
    assert "`shrinkflow rollback --to v0002`" in err
    _say_if_production_moved(SimpleNamespace(root=tmp_path / "none", params=Params()), None)   # no registry
    assert capsys.readouterr().err == ""


def test_a_file_where_the_state_directory_goes_is_named_not_a_traceback(tmp_path):
    """A helper's finding: `.shrinkflow` as a regular file gave a
    FileExistsError traceback, exit 3, in `run` and `schedule`."""
    root = bare_project(tmp_path)
    (root / ".shrinkflow").write_text("")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "status"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{root / '.shrinkflow'} is a file" in proc.stderr and "Traceback" not in proc.stderr
