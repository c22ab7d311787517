"""The outputs people and scripts read stay what they were: `shrinkflow
status --json`, `shrinkflow status`, `shrinkflow versions` (text and
--json) and the server's /metadata, for five registries built from the one
the deploy stage wrote (tests/registry_outputs.py), against what the code at
commit fc418a7 printed for them (tests/data/registry_outputs.json), with one
deliberate change since: the test split's size and the teacher's description
count "texts", not "sentences" (any task's rows), and only that word changed."""

from __future__ import annotations

import json

import pytest

from tests.registry_outputs import GOLDEN, SCENARIOS, capture


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return capture(tmp_path_factory.mktemp("registry-outputs"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_status_versions_and_metadata_print_what_they_printed(outputs, scenario):
    golden = json.loads(GOLDEN.read_text())[scenario]
    now = outputs[scenario]
    assert sorted(now) == sorted(golden)
    for what in golden:
        if golden[what] is None or now[what] is None:
            assert now[what] == golden[what], what
            continue
        assert now[what]["code"] == golden[what]["code"], (what, now[what])
        if "json" in golden[what]:   # /metadata: its keys and values
            assert now[what]["json"] == golden[what]["json"], what
        else:                        # byte for byte: the text and the JSON as printed
            assert now[what]["stdout"] == golden[what]["stdout"], what
            assert now[what]["stderr"] == golden[what]["stderr"], what


def test_the_pinned_outputs_show_what_they_claim_to():
    """The golden file is not a record of errors: each scenario's commands
    printed the production version (or that there is none)."""
    golden = json.loads(GOLDEN.read_text())
    for scenario in ("v0003", "v0002-variant", "v0001"):
        doc = json.loads(golden[scenario]["status --json"]["stdout"])
        assert doc["deployed"]["version"] == scenario[:5] and doc["deployed"]["integrity"] == "verified"
        assert golden[scenario]["/metadata"]["json"]["deployed"]["version"] == scenario[:5]
        assert len(json.loads(golden[scenario]["versions --json"]["stdout"])) == 3
    # v0001's manifest has no labels: they come from its model's own manifest
    assert json.loads(golden["v0001"]["status --json"]["stdout"])["deployed"]["labels"] == ["negative", "positive"]
    assert "re-compressed on a production window" in golden["v0002-variant"]["status"]["stdout"]
    assert golden["corrupted"]["status"]["code"] == 3 and "FAILED" in golden["corrupted"]["status"]["stdout"]
    assert json.loads(golden["empty"]["status --json"]["stdout"])["deployed"] is None
    assert golden["empty"]["versions --json"]["stdout"].strip() == "[]"
