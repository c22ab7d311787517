"""What DVC did with a stage, read from DVC's machine-readable answers
(``dvc status --json``) and the stage's own report, never from DVC's console
wording; and a stage that runs too long is stopped with all it started.

A real DVC project in a temporary directory, with one toy stage whose
command reports itself the way every shrinkflow stage does
(``shrinkflow.bootstrap.mark_stage_ran``, called by ``stages.common.run_stage``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shrinkflow.dvcrun import (HintFilter, StageFailed, StageTimedOut, command_exit_code, repro_stage, skips_repro,
                               stage_timeout_s, up_to_date_stages, what_dvc_did)
from tests.conftest import PROJECT_ROOT

TOY = """\
import io, os, pathlib, signal, sys, time, zipfile
from shrinkflow.bootstrap import mark_stage_ran

mark_stage_ran("toy")
text = pathlib.Path("in.txt").read_text()
with open("attempts.txt", "a") as f:
    f.write("x")
if text.startswith("flaky") and len(pathlib.Path("attempts.txt").read_text()) < 2:
    print("error: toy: the index did not answer", file=sys.stderr)
    sys.exit(75)
if text.startswith("kill"):
    os.kill(os.getpid(), signal.SIGKILL)
if text.startswith("badzip"):
    zipfile.ZipFile(io.BytesIO(b"not a zip"))
if text.startswith("sleep"):
    pathlib.Path("sleeper.pid").write_text(str(os.getpid()))
    time.sleep(300)
if text.startswith("recorded"):  # a new record written (a deploy after its promotion), then a crash
    pathlib.Path("metric.json").write_text('{"n": -1}')
    sys.exit("toy: crashed after its record")
if text.startswith("halfway"):   # a new output written, then a crash
    pathlib.Path("out.txt").write_text("half-written")
    sys.exit("toy: crashed halfway")
if text.startswith("fail"):
    sys.exit("toy: asked to fail")
pathlib.Path("out.txt").write_text(text.upper())
pathlib.Path("metric.json").write_text('{"n": %d}' % len(text))
print("toy ran")
"""

DVC_YAML = """\
stages:
  toy:
    cmd: python toy.py
    deps: [in.txt, toy.py]
    outs: [out.txt]
"""


@pytest.fixture()
def toy(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "toy.py").write_text(TOY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "in.txt").write_text("a\n")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True,
                   timeout=120)
    # the toy stage imports shrinkflow from this checkout
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    return root


def test_what_dvc_did_from_the_two_signals():
    assert what_dvc_did(changed=True, forced=False, ran=True) == "ran"
    assert what_dvc_did(changed=True, forced=False, ran=False) == "restored"
    assert what_dvc_did(changed=False, forced=False, ran=False) == "skipped"
    assert what_dvc_did(changed=False, forced=True, ran=True) == "ran"
    assert what_dvc_did(changed=False, forced=True, ran=False) == "restored"


@pytest.mark.slow  # ~7 s: in the full suite, not the quick run
def test_ran_skipped_restored_and_forced_through_real_dvc(toy):
    lines: list[str] = []
    assert repro_stage("toy", toy, echo=lines.append).status == "ran"
    assert (toy / "out.txt").read_text() == "A\n"
    assert any("toy ran" in line for line in lines)  # the stage's output is streamed as before
    assert repro_stage("toy", toy, echo=lambda _: None).status == "skipped"
    (toy / "in.txt").write_text("b\n")
    assert repro_stage("toy", toy, echo=lambda _: None).status == "ran"
    (toy / "in.txt").write_text("a\n")  # seen before: DVC's run-cache has its output
    assert repro_stage("toy", toy, echo=lambda _: None).status == "restored"
    assert (toy / "out.txt").read_text() == "A\n"
    (toy / "out.txt").unlink()   # its output gone, dvc.lock unchanged (a fresh clone): checked out, not run
    assert repro_stage("toy", toy, echo=lambda _: None).status == "restored"
    assert (toy / "out.txt").read_text() == "A\n"
    assert repro_stage("toy", toy, echo=lambda _: None).status == "skipped"
    assert repro_stage("toy", toy, echo=lambda _: None, force=True).status == "ran"


@pytest.mark.slow  # ~10 s: in the full suite, not the quick run
def test_dvc_status_finds_up_to_date_exactly_the_stages_dvc_repro_skips(toy):
    """A run skips the repro of a stage one ``dvc status`` found up to date
    (shrinkflow.dvcrun.up_to_date_stages): in each state the toy goes
    through, that answer is what ``dvc repro`` then does."""
    def change(what):
        if what == "input":
            (toy / "in.txt").write_text("b\n")
        elif what == "input back":   # seen before: restored from the run-cache, not skipped
            (toy / "in.txt").write_text("a\n")
        elif what == "output gone":
            (toy / "out.txt").unlink()
        elif what == "output edited":
            (toy / "out.txt").write_text("edited by hand\n")
        elif what == "code":
            (toy / "toy.py").write_text(TOY + "\n# a change\n")

    seen = []
    for what in ("never run", "nothing", "input", "nothing", "input back", "output gone", "output edited",
                 "code", "nothing"):
        change(what)
        found = "toy" in up_to_date_stages(["toy"], toy)
        did = repro_stage("toy", toy, echo=lambda _: None).status
        seen.append((what, found, did))
        assert found == (did == "skipped"), seen
    assert [f for _, f, _ in seen] == [False, True, False, True, False, False, False, False, True], seen
    # DVC that cannot answer: nothing is up to date, and each repro says what is wrong
    (toy / "dvc.yaml").write_text("stages: [not, a, mapping\n")
    assert up_to_date_stages(["toy"], toy) == frozenset()


@pytest.mark.parametrize("how", ["no project there", "dvc.yaml not YAML", "not a DVC repo"])
def test_dvc_that_cannot_answer_finds_nothing_up_to_date(tmp_path, how):
    """Each way ``dvc status`` can fail (the process cannot start in a
    missing folder: OSError; DVC exits non-zero: RuntimeError) leaves every
    stage to its own repro, which says what is wrong."""
    root = tmp_path / "project"
    if how != "no project there":
        root.mkdir()
        (root / "dvc.yaml").write_text("stages: [not, a, mapping\n" if how == "dvc.yaml not YAML" else DVC_YAML)
        if how == "dvc.yaml not YAML":
            subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, timeout=120)
    assert up_to_date_stages(["toy"], root) == frozenset()


def test_a_stage_skips_its_repro_only_while_nothing_before_it_in_the_run_changed():
    fresh = frozenset({"data", "train", "compress"})
    skipped, ran, restored = {"status": "skipped"}, {"status": "ran"}, {"status": "restored"}
    assert skips_repro("data", fresh, {})
    assert skips_repro("compress", fresh, {"data": skipped, "train": skipped})
    assert not skips_repro("compress", fresh, {"data": skipped, "train": ran})       # a new teacher
    assert not skips_repro("compress", fresh, {"data": restored, "train": skipped})  # other splits
    assert not skips_repro("validate", fresh, {"data": skipped})                     # DVC found it stale
    assert not skips_repro("data", fresh, {}, force=True)                            # --revalidate's force


# What DVC 3 printed for the data stage of a real `shrinkflow run` (2026-12-02).
DATA_STAGE = """Running stage 'data':
> python -m stages.data
data: 2 classes, rows_train=420
WARNING: 'data/feedback/labels.jsonl' is empty.
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
WARNING: 'data/unlabelled/texts.txt' is empty.
WARNING: 'data/other.txt' is empty.

train:   0%|          | 0/162

epoch 1: train loss 0.6950
"""


def test_the_console_leaves_out_dvcs_git_advice_and_the_empty_by_design_warnings():
    shown: list[str] = []
    hints = HintFilter(shown.append)
    for line in DATA_STAGE.splitlines(keepends=True):
        hints(line)
    hints.flush()
    assert "".join(shown) == """Running stage 'data':
> python -m stages.data
data: 2 classes, rows_train=420
Updating lock file 'dvc.lock'
WARNING: 'data/other.txt' is empty.

train:   0%|          | 0/162

epoch 1: train loss 0.6950
"""
    # a blank line held at the end is passed on by flush
    shown.clear()
    hints = HintFilter(shown.append)
    hints("last\n")
    hints("\n")
    assert shown == ["last\n"]
    hints.flush()
    assert shown == ["last\n", "\n"]


@pytest.mark.slow  # ~5 s: in the full suite, not the quick run
def test_real_dvc_in_a_git_repo_gives_advice_the_console_leaves_out(toy):
    """DVC's wording is what HintFilter knows: in a git repo (DVC with SCM),
    a stage that updates dvc.lock gets the advice, and the console does not
    show it; the failure tail would (StageFailed keeps the raw output)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", "init", "-q"], cwd=toy, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-f", "-q"], cwd=toy, check=True, env=env, timeout=120)
    shown: list[str] = []
    assert repro_stage("toy", toy, echo=shown.append).status == "ran"
    text = "".join(shown)
    assert "toy ran" in text and "Updating lock file 'dvc.lock'" in text
    assert "git add" not in text and "autostage" not in text and "dvc push" not in text, text


def test_a_failing_stage_raises_with_its_output(toy):
    """The failure keeps the tail of what the console showed (not DVC's
    warning that a dep empty by design is empty) and names the command's
    exit code and its last line of error."""
    (toy / "in.txt").write_text("fail\n")
    (toy / "data/feedback").mkdir(parents=True)
    (toy / "data/feedback/labels.jsonl").write_bytes(b"")   # empty until a retrain appends
    (toy / "dvc.yaml").write_text(DVC_YAML.replace("deps: [in.txt, toy.py]",
                                                   "deps: [in.txt, toy.py, data/feedback/labels.jsonl]"))
    shown: list[str] = []
    with pytest.raises(StageFailed, match="stage 'toy' failed") as info:
        repro_stage("toy", toy, echo=shown.append)
    assert "toy: asked to fail" in info.value.tail and info.value.tail in "".join(shown)
    assert "is empty" not in info.value.tail
    assert info.value.command_rc == 1 and info.value.returncode != 0
    # sys.exit("toy: ...") prints a bare line: neither an error line nor an exception's, so it is
    # named as the command's last line
    assert info.value.cause is None
    assert info.value.headline == "stage 'toy' failed (its command exited with 1); its last line of output: " \
                                  "toy: asked to fail"


@pytest.mark.parametrize("how", ["fail", "halfway"])
def test_a_stage_that_fails_leaves_its_previous_outputs_as_dvc_lock_pins_them(toy, how):
    """A helper's finding: a failed data stage left data/prepared (the
    monitor's reference among it) and its metrics deleted, as DVC removes
    a stage's outs before it runs it, so production's monitor failed until
    they were restored by hand. Now the cached outs come back from DVC's
    cache and the ``cache: false`` ones from a copy, whether the command
    failed at once or after writing a new output; a stage that never
    succeeded has nothing to put back."""
    (toy / "dvc.yaml").write_text(DVC_YAML.replace("outs: [out.txt]",
                                                   "outs: [out.txt]\n    metrics:\n      - metric.json:\n"
                                                   "          cache: false"))
    (toy / "in.txt").write_text(f"{how} first\n")
    shown: list[str] = []
    with pytest.raises(StageFailed):
        repro_stage("toy", toy, echo=shown.append)
    assert not any("previous outputs" in line for line in shown), shown   # nothing pinned yet
    (toy / "in.txt").write_text("good\n")
    repro_stage("toy", toy, echo=shown.append)
    assert (toy / "out.txt").read_text() == "GOOD\n" and (toy / "metric.json").read_text() == '{"n": 5}'
    lock = (toy / "dvc.lock").read_text()
    (toy / "in.txt").write_text(f"{how}\n")
    shown.clear()
    with pytest.raises(StageFailed):
        repro_stage("toy", toy, echo=shown.append)
    assert (toy / "out.txt").read_text() == "GOOD\n" and (toy / "metric.json").read_text() == '{"n": 5}'
    assert (toy / "dvc.lock").read_text() == lock
    line = next(line for line in shown if "previous outputs" in line)
    assert line.strip() == ("stage 'toy' did not finish: its previous outputs are back (out.txt from DVC's cache, "
                            "as dvc.lock pins them; metric.json as before it ran)"), shown
    # DVC agrees: only the dependency changed
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=toy, capture_output=True,
                            text=True, timeout=120)
    assert '"changed outs"' not in status.stdout and "in.txt" in status.stdout, status.stdout


def test_a_record_the_failed_stage_wrote_stands_and_a_missing_cache_is_said(toy):
    """A helper's findings: a deploy interrupted after its promotion got its
    old record back (the registry said v0004, the record v0003); with DVC's
    cache gone, the line dropped DVC's reason and advised a checkout that
    could not work."""
    import shutil

    (toy / "dvc.yaml").write_text(DVC_YAML.replace("outs: [out.txt]",
                                                   "outs: [out.txt]\n    metrics:\n      - metric.json:\n"
                                                   "          cache: false"))
    repro_stage("toy", toy, echo=lambda _: None)
    (toy / "in.txt").write_text("recorded\n")
    shown: list[str] = []
    with pytest.raises(StageFailed, match="crashed after its record"):
        repro_stage("toy", toy, echo=shown.append)
    assert (toy / "metric.json").read_text() == '{"n": -1}'        # what the stage wrote stands
    assert (toy / "out.txt").read_text() == "A\n"                  # the cached out is back
    assert any("(out.txt from DVC's cache, as dvc.lock pins them)" in line for line in shown), shown
    shutil.rmtree(toy / ".dvc" / "cache")
    (toy / "in.txt").write_text("fail\n")
    shown.clear()
    with pytest.raises(StageFailed, match="asked to fail"):        # the stage's own failure is what is raised
        repro_stage("toy", toy, echo=shown.append)
    line = next(line for line in shown if "did not finish" in line)
    assert "out.txt could not be restored from DVC's cache (dvc checkout: " in line, line
    assert "`dvc pull` brings them back where a remote has them" in line and "(exit " not in line, line
    assert not (toy / "out.txt").exists()


def test_a_stage_failure_names_its_last_exception_first():
    """Pages of nested tracebacks (a stage that runs a Prefect flow prints
    several) end in one cause: it comes first in the message, and a tail
    cut mid-line starts at the next whole line."""
    from shrinkflow.dvcrun import _whole_lines, failure_cause

    out = ("Traceback (most recent call last):\n  File \"x.py\", line 3\n"
           "IndexError: tuple index out of range\n"
           "  File \"/venv/lib/python3.11/site-packages/prefect/states.py\", line 161, in _get_state_result\n"
           "shrinkflow.errors.ModelError: models/teacher: no model.safetensors\n"
           "ERROR: failed to reproduce 'compress': failed to run: python -m stages.compress, exited with 1\n")
    assert failure_cause(out) == "shrinkflow.errors.ModelError: models/teacher: no model.safetensors"
    assert failure_cause(out.replace("shrinkflow.errors.ModelError", "KeyboardInterrupt")) == \
        "KeyboardInterrupt: models/teacher: no model.safetensors"
    assert failure_cause("ERROR: failed to reproduce 'x'\nkilled\n") is None   # DVC's own line is not a cause
    assert _whole_lines("es/prefect/states.py\nnext line\n") == "next line\n"
    exc = StageFailed("compress", 255, "next line\n", failure_cause(out), command_exit_code(out))
    assert exc.headline == "stage 'compress' failed (its command exited with 1): shrinkflow.errors.ModelError: " \
                           "models/teacher: no model.safetensors"
    assert str(exc) == exc.headline + "; the end of its output:\nnext line\n"
    assert StageFailed("x", 255, "t\n").headline == "DVC could not reproduce stage 'x' (dvc repro exited with 255)"
    assert StageFailed("x", 255, "t\n", None, 1, last="done").headline == \
        "stage 'x' failed (its command exited with 1); its last line of output: done"
    assert StageFailed("x", 255, "t\n", None, -9).headline == \
        "stage 'x' failed (its command was killed by SIGKILL: out of memory, or stopped from outside)"
    assert StageFailed("x", 255, "t\n", None, -11).headline == "stage 'x' failed (its command was killed by SIGSEGV)"
    assert StageFailed("x", 255, "t\n", None, 139, last="Segmentation fault").headline == \
        "stage 'x' failed (its command was killed by SIGSEGV (its shell exited with 139))"
    # past 128 + the last signal's number is an exit code, not a signal
    assert StageFailed("x", 255, "t\n", None, 255, last="bye").headline == \
        "stage 'x' failed (its command exited with 255); its last line of output: bye"


def test_every_signal_reads_as_itself_whichever_shell_reported_it():
    """The whole kind of exit code: every signal, as DVC reports it (minus
    its number) and as a waiting shell does (128 + its number), is named;
    every other code from 0 to 255 is an exit code."""
    import signal

    from shrinkflow.dvcrun import how_it_ended, signal_of

    for sig in signal.Signals:
        n = int(sig)
        assert signal_of(-n) == signal_of(128 + n) == n
        assert how_it_ended(-n).startswith(f"its command was killed by {sig.name}")
        assert how_it_ended(128 + n).startswith(f"its command was killed by {sig.name} (its shell exited with "
                                                f"{128 + n})")
    numbers = {int(s) for s in signal.Signals}
    for rc in range(256):
        if not (rc > 128 and rc - 128 in numbers):
            assert signal_of(rc) is None and how_it_ended(rc) == f"its command exited with {rc}"


def test_any_file_dvc_cannot_parse_says_how_to_mend_it():
    """Whichever file DVC calls invalid, the cause names it and says to
    restore it; only a lock file may also be deleted."""
    from shrinkflow.dvcrun import failure_cause

    for path, name in (("./dvc.lock", "dvc.lock"), ("./dvc.yaml", "dvc.yaml"), ("sub/dvc.lock", "sub/dvc.lock"),
                       ("./params.yaml", "params.yaml")):
        cause = failure_cause(f"'{path}' is invalid.\n")
        assert cause.startswith(f"'{path}' is invalid. Restore it (git checkout -- {name}), or "), cause
        assert cause.endswith("delete it: DVC then runs each stage again or restores it from its run-cache."
                              if name.endswith("dvc.lock") else "correct it."), cause


def test_a_stage_failure_names_the_stages_own_error_line_and_dvcs_reason():
    """A stage's handled error is one ``error: <stage>: <why>`` line
    (stages/common.py): that is the cause, not DVC's "exited with 1" after
    it; when DVC never ran the command, DVC's own reason is."""
    from shrinkflow.dvcrun import failure_cause

    handled = ("Running stage 'data':\n> python -m stages.data\n"
               "error: data: data/user/t.csv: no column 'label' (data.source.label_column)\n"
               "ERROR: failed to reproduce 'data': failed to run: python -m stages.data, exited with 1\n")
    assert failure_cause(handled) == "data: data/user/t.csv: no column 'label' (data.source.label_column)"
    assert command_exit_code(handled) == 1
    missing = "ERROR: failed to reproduce 'data': [Errno 2] No such file or directory: '/p/data/raw'\n"
    assert failure_cause(missing) == "[Errno 2] No such file or directory: '/p/data/raw'"
    assert command_exit_code(missing) is None
    assert command_exit_code("ERROR: failed to reproduce 'x': failed to run: sh -c 'kill -9 $$', exited with -9\n") \
        == -9


def test_any_exception_dvcs_own_error_and_a_signal_are_named(toy, monkeypatch):
    """Real output: an exception whose class name ends in neither Error nor
    Exception is the cause; a dvc.lock DVC cannot parse is DVC's failure (the
    command never ran), named as such; a command killed by SIGKILL says the
    likeliest reason."""
    (toy / "in.txt").write_text("badzip\n")
    with pytest.raises(StageFailed) as info:
        repro_stage("toy", toy, echo=lambda line: None)
    assert info.value.headline == "stage 'toy' failed (its command exited with 1): zipfile.BadZipFile: " \
                                  "File is not a zip file"
    (toy / "in.txt").write_text("kill\n")
    # DVC runs the command through $SHELL, else /bin/sh: bash execs it (DVC sees -9), dash waits for it
    # and exits 128 + 9 after printing "Killed" (CI machines have no $SHELL)
    for shell, rc, how in (("/bin/bash", -9, ""), (None, 137, " (its shell exited with 137)")):
        if shell is None:
            monkeypatch.delenv("SHELL", raising=False)
        else:
            monkeypatch.setenv("SHELL", shell)
        with pytest.raises(StageFailed) as info:
            repro_stage("toy", toy, echo=lambda line: None)
        assert info.value.command_rc == rc and info.value.headline == \
            f"stage 'toy' failed (its command was killed by SIGKILL{how}: out of memory, or stopped from outside)"
    (toy / "in.txt").write_text("a\n")
    (toy / "attempts.txt").unlink()
    (toy / "dvc.lock").write_text('schema: "2.0"\nstages: [oops\n')
    with pytest.raises(StageFailed) as info:
        repro_stage("toy", toy, echo=lambda line: None)
    assert not (toy / "attempts.txt").exists() and info.value.command_rc is None
    assert info.value.headline == "DVC could not reproduce stage 'toy' (dvc repro exited with 255): " \
                                  "'./dvc.lock' is invalid. Restore it (git checkout -- dvc.lock), or delete it: DVC " \
                                  "then runs each stage again or restores it from its run-cache."
    # deleted, as the line says: the stage runs again
    (toy / "dvc.lock").unlink()
    assert repro_stage("toy", toy, echo=lambda line: None).status == "ran"


def test_a_failure_is_named_by_its_last_exception_whatever_its_name():
    """The line after a traceback's frames names the exception; a later
    exception line (a nested traceback's, a logged one) wins."""
    from shrinkflow.dvcrun import failure_cause

    frames = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    f()\n'
    assert failure_cause(frames + "pyarrow.lib.ArrowInvalid: CSV parse error: row 3\n") == \
        "pyarrow.lib.ArrowInvalid: CSV parse error: row 3"
    assert failure_cause(frames + "StopIteration\nERROR: failed to reproduce 'x': failed to run: y, exited with 1\n") \
        == "StopIteration"
    assert failure_cause(frames + "StopIteration\n\nDuring handling of the above exception, another exception "
                         "occurred:\n\n" + frames + "KeyError: 'label'\n") == "KeyError: 'label'"
    # a traceback interleaved with other output: the first unindented line that is not an exception is not one
    assert failure_cause(frames + "epoch 1 of 3 done\n") is None
    assert failure_cause("ERROR: unexpected error - [Errno 28] No space left on device\n") == \
        "unexpected error - [Errno 28] No space left on device"


def test_only_a_failure_that_may_pass_is_retried():
    """Prefect's retry condition for a stage: a StageFailed whose command
    exited STAGE_EXIT_TRANSIENT; not another exit code, a timeout, DVC's own
    failure or another exception. Only fetch gets retries."""
    from prefect.states import Failed

    from tasks.dvc import repro_stage_with_retries, retry_if_transient

    def retried(exc):
        return retry_if_transient(None, None, Failed(data=exc))

    assert retried(StageFailed("fetch", 255, "", "fetch: index did not answer", 75))
    assert not retried(StageFailed("fetch", 255, "", "fetch: no such file", 1))
    assert not retried(StageFailed("fetch", 255, "", "'./dvc.lock' is invalid.", None))
    assert not retried(StageTimedOut("fetch", 10, "")) and not retried(ValueError("x"))
    fetch, train = repro_stage_with_retries("fetch"), repro_stage_with_retries("train")
    assert (fetch.retries, fetch.retry_condition_fn, train.retries) == (2, retry_if_transient, 0)


def test_a_source_that_never_answered_says_how_often_it_was_tried_and_what_to_do_offline(monkeypatch, tmp_path):
    """The closing line of a fetch whose every try found the index silent
    names the tries and the two offline ways out; any other failure, even of
    fetch, gets no such advice."""
    from flows.cli import crash_message

    monkeypatch.setenv("SHRINKFLOW_CACHE_DIR", str(tmp_path / "cache"))
    cause = "fetch: cannot read the package index page http://x/simple/p/: timed out (a passing failure: a later " \
            "try may succeed)"
    line = crash_message(StageFailed("fetch", 255, "", cause, 75))
    assert line == (f"the lifecycle failed: stage 'fetch' failed (its command exited with 75): {cause} (its output "
                    f"is above); tried 3 times. Offline, point PIP_INDEX_URL at a mirror, or put the archive in "
                    f"{tmp_path / 'cache'} (or $SHRINKFLOW_CACHE_DIR), where it is checked against its sha256 "
                    "before use: docs/operations.md")
    assert crash_message(StageFailed("fetch", 255, "", "fetch: no such file", 1)) == \
        "the lifecycle failed: stage 'fetch' failed (its command exited with 1): fetch: no such file (its output " \
        "is above)"
    assert "tried" not in crash_message(StageTimedOut("fetch", 10, ""))


@pytest.mark.slow  # ~25 s (Prefect's test server, one 5 s retry delay): the full suite runs it
def test_the_lifecycle_retries_fetch_only_when_its_source_did_not_answer(toy, prefect_api):
    """A fetch whose command exits STAGE_EXIT_TRANSIENT is run again (5 s
    later, real Prefect retries) and succeeds; one that exits 1 is not run
    again."""
    from prefect import flow

    from tasks.dvc import repro_stage_with_retries

    (toy / "dvc.yaml").write_text(DVC_YAML.replace("  toy:", "  fetch:"))

    @flow
    def fetch_once(root: str) -> dict:
        return repro_stage_with_retries("fetch")("fetch", root)

    (toy / "in.txt").write_text("flaky\n")
    assert fetch_once(str(toy))["status"] == "ran"
    assert (toy / "attempts.txt").read_text() == "xx" and (toy / "out.txt").read_text() == "FLAKY\n"
    (toy / "attempts.txt").unlink()
    (toy / "in.txt").write_text("fail\n")
    with pytest.raises(StageFailed, match="its command exited with 1"):
        fetch_once(str(toy))
    assert (toy / "attempts.txt").read_text() == "x"


@pytest.mark.slow  # ~25 s: 12 shells stopped while they fork
def test_a_tree_stopped_while_a_shell_forks_leaves_no_orphan():
    """stop_tree lists a process's children only once the kernel shows it
    stopped: SIGSTOP is asynchronous, and a shell (dash, DVC's /bin/sh when
    $SHELL is unset, as on CI) forking at that moment left its new child
    orphaned and running (the timeout test below failed so once). A shell
    forking as fast as it can is stopped 12 times at different moments; no
    child of any survives. Without the wait, 2 of 3 runs of 20 here left one."""
    import psutil

    from shrinkflow.detached import stop_tree

    left = []
    for trial in range(12):
        tag = f"3{trial}.{os.getpid() % 1000}"   # a sleep only this trial starts
        proc = subprocess.Popen(["/bin/sh", "-c", f"while :; do sleep {tag} & kill $!; wait $!; done"],
                                stderr=subprocess.DEVNULL)   # one child at a time, forked again and again
        time.sleep(0.05 + 0.017 * trial)
        stop_tree(proc, grace_s=5)
        proc.wait(timeout=30)
        time.sleep(0.2)
        found = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", tag]]
        for p in found:
            p.kill()
        left += found
    assert not left, f"{len(left)} orphaned children still running"


@pytest.mark.slow  # 20 s of timeout: on a loaded box DVC and the stage need most of it to start
def test_a_stage_past_its_timeout_is_stopped_with_what_it_started(toy):
    import psutil

    (toy / "in.txt").write_text("sleep\n")
    t0 = time.monotonic()
    with pytest.raises(StageTimedOut, match="ran longer than 20 s"):
        repro_stage("toy", toy, echo=lambda _: None, timeout_s=20)
    assert time.monotonic() - t0 < 80
    # the stage command (a grandchild: dvc started it) was running, and is
    # gone: killed, it may take the kernel a moment on a loaded box (seen once
    # still "running" right after), so it has 10 s; a command left orphaned
    # sleeps 300 s and fails this
    pid = int((toy / "sleeper.pid").read_text())

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()


SPAWNER = """\
import subprocess, sys, time
while True:   # a new sleeping child every few ms, as DVC starting a stage command at the worst moment
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(sys.argv[1], "a") as f:
        f.write(f"{child.pid}\\n")
    time.sleep(0.005)
"""


def test_stopping_a_tree_leaves_no_child_it_was_starting(tmp_path):
    """A stage that timed out while DVC was starting its command left the
    command running, orphaned (seen once in the suite on a loaded box): the
    tree was listed, then signalled, and a child started in between. It is
    frozen before it is listed now; a parent that never stops starting
    children loses every one."""
    import psutil

    from shrinkflow.detached import stop_tree

    pids = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER, str(pids)])
    deadline = time.monotonic() + 60
    while (not pids.is_file() or len(pids.read_text().split()) < 5) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_tree(parent, grace_s=5)
    assert parent.poll() is not None
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) >= 5
    alive = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"{len(alive)} of {len(started)} children outlived stop_tree"


def test_only_the_markers_of_dead_processes_are_swept(tmp_path):
    """What a SIGKILLed shrinkflow leaves (an empty marker folder named after
    its pid) goes at the next stage; a live process's, a folder without a
    pid, a plain file and other names stay."""
    from shrinkflow.dvcrun import MARKER_PREFIX, sweep_orphaned_markers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f"{MARKER_PREFIX}{dead.pid}-x1", "dead_full": f"{MARKER_PREFIX}{dead.pid}-x2",
             "live": f"{MARKER_PREFIX}{os.getpid()}-x3", "no_pid": f"{MARKER_PREFIX}abc123",
             "old_digits": f"{MARKER_PREFIX}{dead.pid}",  # an older random name of digits alone
             "other": f"other-{dead.pid}-x4"}
    for name in names.values():
        (tmp_path / name).mkdir()
    (tmp_path / names["dead_full"] / "ran").write_text("")
    (tmp_path / f"{MARKER_PREFIX}{dead.pid}-file").write_text("")
    assert sweep_orphaned_markers(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["no_pid"], names["old_digits"], names["other"], f"{MARKER_PREFIX}{dead.pid}-file"])
    assert sweep_orphaned_markers(tmp_path) == 0
    # the stage a killed shrinkflow left running finds its folder swept: it goes on, nobody is listening
    from shrinkflow.bootstrap import STAGE_RAN_ENV, mark_stage_ran

    mark_stage_ran("toy", {STAGE_RAN_ENV: str(tmp_path / names["dead"] / "ran")})
    assert not (tmp_path / names["dead"]).exists()


def test_the_stage_timeout_comes_from_the_environment():
    assert stage_timeout_s({}) == 12 * 3600
    assert stage_timeout_s({"SHRINKFLOW_STAGE_TIMEOUT_S": "90"}) == 90.0
    with pytest.raises(ValueError, match="positive"):
        stage_timeout_s({"SHRINKFLOW_STAGE_TIMEOUT_S": "0"})


@pytest.mark.slow  # ~6 s: in the full suite, not the quick run (kept under 3 minutes)
def test_a_torn_dvc_rwlock_is_set_aside_and_dvc_runs_again(tmp_path):
    """A DVC process killed while rewriting .dvc/tmp/rwlock leaves it empty
    (or half-written): every DVC command then fails. repair_torn_rwlock sets
    it aside under DVC's own guard lock, and DVC runs again; a whole file,
    or one whose guard another process holds, is left as it is."""
    import zc.lockfile

    from shrinkflow.dvcrun import dvc_command, repair_torn_rwlock

    root = tmp_path / "repo"
    root.mkdir()
    dvc_command(["init", "--no-scm", "-q"], root)
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    assert repair_torn_rwlock(root) is None                       # no file: nothing to do
    for torn in (b"", b'{"read": {}, "wri'):
        rwlock.write_bytes(torn)
        with pytest.raises(RuntimeError, match="Unable to read RWLock-file"):
            dvc_command(["repro", "-f"], root)
        guard = zc.lockfile.LockFile(str(rwlock.with_name("rwlock.lock")))   # a DVC process writing it now
        try:
            assert repair_torn_rwlock(root) is None and rwlock.read_bytes() == torn
        finally:
            guard.close()
        warning = repair_torn_rwlock(root)
        assert warning and "torn" in warning and not rwlock.exists()
        aside = [p for p in rwlock.parent.iterdir() if p.name.startswith("rwlock.torn-")]
        assert aside and aside[0].read_bytes() == torn
        aside[0].unlink()
        dvc_command(["repro", "-f"], root)                         # DVC runs again
    rwlock.write_text('{"read": {}, "write": {}}')
    assert repair_torn_rwlock(root) is None and rwlock.exists()    # a whole file stays


def test_dvcs_error_after_a_progress_bar_without_a_newline_is_still_read():
    """A command killed mid progress bar: its last output has no newline, and
    DVC's closing line follows on the same line (seen with `kill -9` of the
    train stage); the exit code is still read, and a signal's victim gets no
    "last line" (a progress bar says nothing of why)."""
    from shrinkflow.dvcrun import failure_cause, last_line

    out = ("Running stage 'train':\n> python -m stages.train\n"
           "train:   0%|          | 0/464 [00:00<?, ?step/s]ERROR: failed to reproduce 'train': failed to run: "
           "python -m stages.train, exited with -9\n")
    assert command_exit_code(out) == -9 and failure_cause(out) is None
    exc = StageFailed("train", 255, "", failure_cause(out), command_exit_code(out), last_line(out))
    assert exc.headline == "stage 'train' failed (its command was killed by SIGKILL: out of memory, or stopped " \
                           "from outside)"
    bar = out.replace("exited with -9", "exited with 1")
    assert command_exit_code(bar) == 1 and last_line(bar) == "train:   0%|          | 0/464 [00:00<?, ?step/s]"


def test_the_stages_table_shows_no_seconds_for_a_stage_skipped_on_dvc_status_alone():
    """A stage skipped on the run's one `dvc status` ran no process: the
    artifact says so instead of a 0.0 that reads as a measurement; a stage
    `dvc repro` skipped or ran keeps the seconds its repro took."""
    from shrinkflow.dvcrun import StageRun
    from tasks.publish import stages_markdown

    md = stages_markdown({"data": StageRun("data", "skipped", 0.0, checked_by="dvc status").to_dict(),
                          "compress": StageRun("compress", "ran", 12.34).to_dict(),
                          "validate": StageRun("validate", "skipped", 0.71).to_dict(),
                          "deploy": {"status": "skipped", "seconds": 0.0}})   # a record from before the field
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| data | skipped (up to date: dvc status) | - |", "| compress | ran | 12.3 |",
                    "| validate | skipped | 0.7 |", "| deploy | skipped | 0.0 |"]
    assert StageRun("train", "ran", 1.0).to_dict()["checked_by"] == "dvc repro"
