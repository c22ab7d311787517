"""Registries with known contents, and what `status`, `versions` and
/metadata print for them: the outputs people and scripts read, pinned.

``build(root, scenario)`` copies the registry of tests/data/artifacts/
(written by the deploy stage: three versions, v0001 from before versions
recorded their labels) and gives each version model files, so its hashes
verify. ``capture(tmp_path)`` runs the commands on every scenario and
returns what each printed, its exit code and what /metadata answered, with
the temporary directory written as ``<tmp>``.

tests/data/registry_outputs.json holds what the code at commit fc418a7
(before status, versions and /metadata rendered typed objects) printed for
the same registries; tests/test_registry_outputs.py compares. To see a
difference, not to bless one::

    PYTHONPATH=$PWD python -m tests.registry_outputs > /tmp/now.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from shrinkflow.files import content_hash, file_hashes, read_json, write_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = PROJECT_ROOT / "tests" / "data" / "artifacts" / "registry"
GOLDEN = PROJECT_ROOT / "tests" / "data" / "registry_outputs.json"
LABELS = ["negative", "positive"]

# production v0003 as deployed; v0002 made production by hand with what an
# older or a re-compressed version lacks or adds; v0001 (no labels in its
# manifest: read from the model's own); v0003 with a corrupted file; nothing.
SCENARIOS = ("v0003", "v0002-variant", "v0001", "corrupted", "empty")


def deploy_record(candidate: str) -> dict:
    """A record as the deploy stage hands ``Registry.promote`` (a full version
    manifest once the registry adds its keys), from the fixture's v0003, for
    ``candidate``; without ``labels`` (the registry records the model's own)
    and ``serving`` (the server decides per_row from the model graph)."""
    manifest = read_json(FIXTURE / "versions" / "v0003" / "manifest.json")
    added = ("version", "created_at", "files", "content_hash", "gates", "same_model_as", "labels", "serving")
    return {**{k: v for k, v in manifest.items() if k not in added}, "candidate": candidate}


def _give_model_files(root: Path, version: str) -> None:
    """Model files for ``version``, and its manifest's hashes set to theirs."""
    model = root / "versions" / version / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(f"weights of {version}".encode())
    (model / "shrinkflow_model.json").write_text(json.dumps({"format": "onnx", "max_seq_len": 32,
                                                             "labels": LABELS, "recipe": []}))
    path = root / "versions" / version / "manifest.json"
    manifest = read_json(path)
    manifest["files"] = file_hashes(model)
    manifest["content_hash"] = content_hash(manifest["files"])
    write_json(path, manifest)


def _variant(root: Path) -> None:
    """v0002 as production without ``serving`` or ``roi`` (deployed before
    they were recorded), re-compressed on a production window, with an
    accuracy gate that failed without being enforced."""
    path = root / "versions" / "v0002" / "manifest.json"
    m = read_json(path)
    del m["serving"]
    m["roi"] = None
    m["lineage"]["window"] = {"rows_distill": 1200, "rows_heldout": 300, "texts_md5": "0123abcd",
                              "monitor_flow_run": "clever-fox", "triggers": ["drift", "accuracy"]}
    m["gates"]["min_accuracy"] = {**m["gates"]["min_accuracy"], "passed": False, "enforced": False,
                                  "note": "reported, not enforced"}
    write_json(path, m)
    write_json(root / "aliases.json", {"production": "v0002", "previous_production": "v0003"})


def build(root: Path, scenario: str) -> Path:
    """The registry of ``scenario`` (one of SCENARIOS) at ``root``."""
    if scenario == "empty":
        return root
    shutil.copytree(FIXTURE, root)
    for version in ("v0001", "v0002", "v0003"):
        _give_model_files(root, version)
    if scenario == "v0002-variant":
        _variant(root)
    elif scenario == "v0001":
        write_json(root / "aliases.json", {"production": "v0001", "previous_production": "v0003"})
    elif scenario == "corrupted":
        (root / "versions" / "v0003" / "model" / "model.onnx").write_bytes(b"rot")
    return root


def _cli(project: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _metadata(registry_root: Path) -> dict | None:
    """/metadata of a server holding production (verified when it loaded), in
    this process: the operations router over a stand-in state."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from shrinkflow.registry import Registry
    from shrinkflow.serving import operations
    from shrinkflow.serving.holder import LoadedModel

    registry = Registry(registry_root)
    version = registry.alias()
    if version is None:
        return None
    app = FastAPI()
    app.include_router(operations.router)
    # per_row as the manifest says, else as the model graph would
    declared = (read_json(registry_root / "versions" / version / "manifest.json").get("serving") or {}).get("per_row")
    loaded = LoadedModel(version, None, tuple(LABELS), per_row=bool(declared),
                         per_row_source="manifest" if declared is not None else "model graph")
    app.state.serving = SimpleNamespace(registry=registry, holder=SimpleNamespace(current=loaded, refused=None),
                                        params=SimpleNamespace(truncation="head"), batcher=None)
    with TestClient(app) as client:
        answer = client.get("/metadata")
    return {"code": answer.status_code, "json": answer.json()}


def capture(tmp_path: Path) -> dict:
    """What each command printed (and /metadata answered) for each scenario."""
    out = {}
    for scenario in SCENARIOS:
        project = tmp_path / scenario
        project.mkdir()
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy(PROJECT_ROOT / name, project / name)
        build(project / "registry", scenario)
        got = {" ".join(args): _cli(project, *args)
               for args in (("status", "--json"), ("status",), ("versions",), ("versions", "--json"))}
        got["/metadata"] = _metadata(project / "registry")
        out[scenario] = json.loads(json.dumps(got).replace(str(tmp_path), "<tmp>"))
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(capture(Path(tmp)), indent=1, sort_keys=True))
