"""The catalog of project paths, relative to the project root.

Stages, tasks, flows and tests import these names instead of spelling paths
out, and ``tests/test_dvc_graph.py`` checks that dvc.yaml declares the same
paths as deps and outs. Constants only: importing this module touches nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

DVC_YAML = Path("dvc.yaml")
PARAMS = Path("params.yaml")

# The fetch stage's out: a directory, so that it can hold either the pinned
# archive (RAW, the built-in task) or copies of the user's files under
# canonical names (train.csv, test.csv, ...: shrinkflow.data.raw_name).
RAW_DIR = Path("data/raw")
RAW = RAW_DIR / "source.tar.gz"
PREPARED = Path("data/prepared")
# The four movie-review splits plus the product-review (shifted) domain.
SPLITS = ("train", "val", "test", "reference", "shifted")
# Unlabelled text the teacher labels for distillation; the re-compression flow
# writes its snapshot of production text here. The only place this path is
# named in code: dvc.yaml's compress stage lists it as a dep (checked by test).
UNLABELLED = Path("data/unlabelled/texts.txt")
# Re-compression: the held-out part of the production window (validate gates
# teacher agreement on it) and what the window was (deploy puts it in lineage).
WINDOW_HELDOUT = Path("data/unlabelled/heldout.txt")
WINDOW_META = Path("data/unlabelled/window.json")
# Re-compression: a verified copy of the production model (``model/``) and
# which version it is (``version.json``); validate measures it as one more
# candidate, so a re-compression never deploys something worse than keeping
# it. Holds only its README by default: no production candidate.
WINDOW_PRODUCTION = Path("data/unlabelled/production")
PRODUCTION_MODEL = WINDOW_PRODUCTION / "model"
PRODUCTION_META = WINDOW_PRODUCTION / "version.json"
# Re-compression: the production version's distilled students (fp32, full
# vocabulary), one directory per candidate, copied from the registry by the
# re-compression flow; a distill step warm-starts from a matching one. Holds
# only a README in a fresh project, so the compress dep always exists.
WARM_START = Path("data/unlabelled/warm_start")
# Every snapshot, content-addressed, tracked by `dvc add` (data/windows.dvc):
# the window any version was compressed from can be restored by its hash.
WINDOWS_ARCHIVE = Path("data/windows")

# Retrain: the production labels, one JSON object per line ({"text", "label"}:
# the label's name), deduplicated by text (shrinkflow.feedback). Committed
# empty, so a fresh project has it; a data stage dep (its md5 in dvc.lock is
# the dataset's version), split into FEEDBACK_SPLITS by a hash of each text.
FEEDBACK = Path("data/feedback/labels.jsonl")
# Every version of it, content-addressed, tracked by `dvc add`
# (data/feedback/archive.dvc) and pushed when a default remote is set.
FEEDBACK_ARCHIVE = Path("data/feedback/archive")
# What the last retrain was: the monitor run that asked for it, the dataset's
# md5 and the old teacher's figures measured before train replaced it
# (shrinkflow.artifacts.RetrainRecord; validate gates the new teacher on it,
# deploy puts it in lineage). Committed with no retrain recorded.
RETRAIN_RECORD = Path("data/feedback/retrain.json")
# Retrain with train.retrain_keep_share > 0: the kept teacher (the one the
# retrain replaces), copied here by the retrain flow before train runs (DVC
# removes models/teacher first); the train stage averages the new teacher's
# weights with it. A train dep; holds only a README in a fresh project.
RETRAIN_KEPT_TEACHER = Path("data/feedback/kept_teacher")
RETRAIN_KEPT_TEACHER_MODEL = RETRAIN_KEPT_TEACHER / "model"
# Retrains whose teacher failed its gates, one JSON object per line (when,
# the feedback dataset's md5, the rejected teacher's hash, the failed gates):
# the project was put back as it was before each (shrinkflow.retrain). Not a
# stage dep. Created by the first rejection.
REJECTED_RETRAINS = Path("data/feedback/rejected.jsonl")
# The files a retrain changes that DVC's cache cannot give back (dvc.lock,
# the feedback dataset, the retrain record, the stages' cache: false outs),
# copied here before the retrain's lifecycle runs.
RETRAIN_BEFORE = Path(".shrinkflow/retrain/before")
# The data stage's splits of FEEDBACK: fine-tuned on, and held out to gate
# the retrained teacher. Empty by default.
FEEDBACK_SPLITS = ("feedback_train", "feedback_heldout")

TEACHER = Path("models/teacher")
CANDIDATES = Path("models/candidates")
SMALL_DIRECT = Path("models/small_direct")
# Each distilled candidate's student before vocabulary pruning and
# quantization (fp32 torch weights, full vocabulary): what deploy keeps with
# the version, for the next re-compression to warm-start from. Not inside
# the candidate's directory, whose size validate measures.
STUDENTS = Path("models/students")

METRICS_DATA = Path("metrics/data.json")
METRICS_TRAIN = Path("metrics/train.json")
METRICS_COMPRESS = Path("metrics/compress.json")
METRICS_VALIDATE = Path("metrics/validate.json")
METRICS_SMALL_DIRECT = Path("metrics/small_direct.json")
METRICS_FRONTIER = Path("metrics/frontier.json")
# What `dvc metrics show` compares: a few figures per stage
# (shrinkflow.headline); the files above are plain outs.
HEADLINE_DIR = Path("metrics/headline")
HEADLINE_DATA = HEADLINE_DIR / "data.json"
HEADLINE_TRAIN = HEADLINE_DIR / "train.json"
HEADLINE_VALIDATE = HEADLINE_DIR / "validate.json"
HEADLINE_SMALL_DIRECT = HEADLINE_DIR / "small_direct.json"
HEADLINE_FRONTIER = HEADLINE_DIR / "frontier.json"
GATES_JSON = Path("reports/gates.json")
GATES_MD = Path("reports/gates.md")
FRONTIER_MD = Path("reports/frontier.md")
FRONTIER_PNG = Path("reports/frontier.png")
DEPLOYMENT = Path("deploy/deployment.json")

# Local state, git-ignored: Prefect's home (database, logs) and run scratch.
PREFECT_HOME = Path(".prefect")
STATE = Path(".shrinkflow")
# Built candidates by content key, reused when a candidate's inputs are unchanged.
CANDIDATE_CACHE = STATE / "cache" / "candidates"
# The teacher's outputs (logits, layer outputs) on the training split, by
# teacher, token ids and layers: every distillation of the same teacher reuses them.
TEACHER_OUTPUT_CACHE = STATE / "cache" / "teacher_outputs"
# Labels each model predicted on each split, by model content hash and texts
# (shrinkflow.prediction_cache): a re-compression re-predicts only what is new.
PREDICTION_CACHE = STATE / "cache" / "predictions"
# The monitor's decision history (cooldown, dedup).
MONITOR_STATE = STATE / "monitor" / "decisions.jsonl"
# What a monitor run computes on the reference split, per deployed version
# and teacher (monitoring/reference_cache.py): rebuilt when either changes.
MONITOR_CACHE = STATE / "monitor" / "cache"


# The task's label names, sorted; a split's label column holds their indices
# (shrinkflow.labels). Written by the data stage.
LABELS_JSON = PREPARED / "labels.json"
# The user's unlabelled, production-like text (data.source.unlabelled_path),
# cleaned, one column ``text``; empty for the built-in task. Written by the
# data stage. Not UNLABELLED: the re-compression flow owns that file.
UNLABELLED_PREPARED = PREPARED / "unlabelled.parquet"
# The user's own data files (data.source.kind: files) live under here: the
# fetch stage depends on this directory, so a new export re-runs data and
# everything after it, and an unchanged one skips them.
USER_DATA = Path("data/user")


def split_path(name: str) -> Path:
    return PREPARED / f"{name}.parquet"


def cache_dir() -> Path:
    """Where the fetched source archive is cached between clones."""
    return Path(os.environ.get("SHRINKFLOW_CACHE_DIR", Path.home() / ".cache" / "shrinkflow"))
