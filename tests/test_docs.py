"""The docs stay true: the params reference is generated from config.py and
current, code defaults and params.yaml agree, every relative link resolves,
and the README keeps the two commands CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from shrinkflow import paramsdoc
from shrinkflow.config import Params, load_params
from tests.conftest import PROJECT_ROOT

# Where params.yaml deliberately sets something other than the code default,
# with the reason. Anything else that differs fails the test below: a default
# has one source, and the default run uses it.
ALLOWED = {
    "compress.candidates": "the default run builds the int8 fallback and the distilled student; the code "
                           "default is the minimal safe list (int8 only)",
    "compress.candidates.int8.quantize.per_channel":
        "measured for the teacher's int8 (bench/results/int8_granularity.md: per tensor lost 5.45 points on unseen "
        "tweets); the generic default (per tensor) is what the default student's int8 keeps (as its default it "
        "missed the deploy gate twice: bench/results/monitoring_per_channel.md) and a user's own candidates were "
        "measured with",
    "compress.candidates.student-l0135-int8.distill.layers":
        "the default student has four layers for room under the deploy gate (docs/compression.md, 'Four layers'); "
        "the code default [0, 2, 4] is the 3-layer student a user's own recipe without layers was measured with",
    "compress.candidates.student-l0135-int8.vocab_prune.min_count":
        "the student keeps tokens seen twice; min_count 1 is the generic default (params/sweep.yaml compares "
        "both: l024-vocab-int8 and l024-vocab2-int8)",
    "compress.candidates.student-l0135-int8.distill.warm_start_epochs":
        "measured for the default student on tweets (bench/results/recompress_anchor.md): one epoch over a "
        "larger in-domain anchor; the generic default (2 epochs over 4 rows per window text) is what the "
        "warm-start tests and a user's own student were measured with",
    "compress.candidates.student-l0135-int8.distill.warm_start_train_rows_per_window_text":
        "with warm_start_epochs above (bench/results/recompress_anchor.md)",
    "compress.candidates.student-l0135-int8.distill.warm_start_window_augment_copies":
        "measured for the default student on tweets (bench/results/recompress_window_augment1.md); the generic "
        "default 0 adds no rows (nor their compress time) to a user's own student, not measured with it",
    "compress.candidates.student-l0135-int8.distill.warm_start_interpolation":
        "measured for the default student on tweets (bench/results/recompress_rows.md); the generic default 0 "
        "re-distils without interpolation, as a user's own student was measured",
}


def differing_defaults(model: BaseModel, raw: dict, path: str = "") -> list[str]:
    """Key paths whose value in ``raw`` (a params.yaml section) differs from
    the code default of that field. Recipe steps are compared with their
    step's defaults, by candidate name and method."""
    out = []
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        if key not in raw:
            continue
        where = f"{path}.{key}" if path else key
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(raw[key], dict):
            if not field.is_required() and type(field.get_default()) is not type(value):
                continue  # another kind of section (a union member): no default to compare with
            out += differing_defaults(value, raw[key], where)
        elif key == "candidates":
            if value != field.get_default():
                out.append(where)
            for cand, raw_cand in zip(value, raw[key]):
                for step, raw_step in zip(cand.recipe, raw_cand.get("recipe", [])):
                    out += differing_defaults(step, raw_step, f"{where}.{cand.name}.{step.method}")
        elif not field.is_required() and value != field.get_default():
            out.append(where)
    return out


def test_params_yaml_sets_the_code_defaults_except_where_allowed():
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert sorted(differing_defaults(params, raw)) == sorted(ALLOWED)


def test_the_default_check_finds_a_changed_default():
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["validate"]["latency"]["rounds"] = 10
    raw["compress"]["candidates"][1]["recipe"][0]["alpha_kl"] = 0.5
    params = Params.model_validate(raw)
    found = set(differing_defaults(params, raw)) - set(ALLOWED)
    assert found == {"validate.latency.rounds", "compress.candidates.student-l0135-int8.distill.alpha_kl"}


def test_the_params_reference_is_current():
    # Regenerate with: python -m shrinkflow.paramsdoc
    assert (PROJECT_ROOT / paramsdoc.OUTPUT).read_text(encoding="utf-8") == paramsdoc.render()


def test_the_params_reference_covers_every_key_with_its_default_and_meaning():
    text = paramsdoc.render()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), \
        [line for line in rows if line.rstrip().endswith("|  |")]  # a key with no meaning: comment it in config.py
    assert "| `rounds` | integer (≥ 1, ≤ 1000) | `20` | validate times the teacher" in text
    assert "## `validate`" in text and "#### `compress.candidates[].recipe[]` (method: distill)" in text


def test_a_comment_above_a_field_becomes_its_meaning():
    class Demo(BaseModel):
        # Why this is 3.
        # Second line.
        a: int = 3
        b: str = "x"  # inline
        c: bool = True

    assert paramsdoc.field_comments(Demo) == {"a": "Why this is 3. Second line.", "b": "inline"}


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(md: Path) -> list[str]:
    """Every link target in a markdown file that is not a URL or an anchor,
    outside fenced code blocks, without its #fragment."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    targets = [a or b for a, b in LINK.findall(text)]
    return [t.split("#")[0] for t in targets if not re.match(r"^[a-z]+:|^#", t) and t.split("#")[0]]


DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_points_to_an_existing_file(md):
    missing = [t for t in relative_links(md) if not (md.parent / t).exists()]
    assert not missing, f"{md.name} links to missing files: {missing}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[ok](x.md) [gone](docs/nope.md#a) ![img](nope.png) [web](https://e.org) [a](#top)\n"
                  "```\n[in code](ignored.md)\n```\n")
    assert relative_links(md) == ["x.md", "docs/nope.md", "nope.png"]


def test_the_readme_links_every_doc():
    readme = set(relative_links(PROJECT_ROOT / "README.md"))
    docs = {f"docs/{p.name}" for p in (PROJECT_ROOT / "docs").glob("*.md")}
    assert docs <= readme, sorted(docs - readme)


def test_the_readme_starts_with_the_two_commands_ci_runs():
    # .ci/run runs the second line; keep both byte-identical.
    head = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8").split("\n")[:5]
    assert head == [
        "# shrinkflow",
        "",
        "```bash",
        "bash scripts/setup.sh && .venv/bin/shrinkflow run            # set up, then run the full lifecycle on params.yaml",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q       # set up, then run the test suite (what .ci/run runs)",
    ]
