# How tests/data/typed_before/ was written, at commit fc418a7 (the code before the typed documents):
#   PYTHONPATH=$PWD python tests/data/typed_before/make.py tests/data/typed_before
# It calls the old dict-based API, so it does not run on later commits: the files are the reference.
import json, sys
from pathlib import Path
from shrinkflow.files import write_json, atomic_write_text
from shrinkflow.headline import validate_headline
from shrinkflow.markdown import validation_markdown
from shrinkflow.validation import deployed_figures, validate_runs
from tests.typed_cases import cases

out = Path(sys.argv[1])
for name, kw in cases().items():
    d = out / name
    metrics, gates = validate_runs(**kw)
    write_json(d / "validate.json", metrics)
    write_json(d / "gates.json", gates)
    write_json(d / "headline.json", validate_headline(metrics))
    atomic_write_text(d / "gates.md", validation_markdown(metrics, gates))
    if gates["selected"]:
        atomic_write_text(d / "lifecycle.md", validation_markdown(metrics, gates, "v0007", True))
        write_json(d / "deployed.json", deployed_figures(metrics, gates["selected"]))
    print(name, gates["selected"], gates["reason"][:100])

from shrinkflow.files import read_json
from shrinkflow.markdown import roi_markdown
atomic_write_text(out / "roi.md", roi_markdown(read_json("tests/data/artifacts/deployment.json")["roi"]))
