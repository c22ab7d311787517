"""Params validation: one test per error class, each naming the key path."""

from __future__ import annotations

import copy

import pydantic
import pytest
import yaml

from shrinkflow.config import ParamsError, load_params, parse_params
from tests.conftest import PROJECT_ROOT


@pytest.fixture
def raw():
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def problems(raw_params) -> dict[str, str]:
    with pytest.raises(ParamsError) as info:
        parse_params(raw_params)
    return dict(info.value.problems)


def test_default_params_file_is_valid_and_frozen():
    p = load_params(PROJECT_ROOT / "params.yaml")
    assert p.validate_.gates.max_accuracy_drop == 0.01
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen") as info:
        p.train.epochs = 5
    assert info.value.errors()[0]["type"] == "frozen_instance" and p.train.epochs != 5


def test_unknown_key_is_named(raw):
    raw["compress"]["candidates"][0]["recipe"][0]["bitz"] = 8
    raw["monitor"]["window_lastn"] = 3     # a newcomer's typo: the key it meant is suggested
    raw["monitor"]["colour"] = "red"       # nothing close: no guess
    found = problems(raw)
    assert "unknown key" in found["compress.candidates.0.recipe.0.bitz"]
    assert found["compress.candidates.0.recipe.0.bitz"].endswith("did you mean 'bits'?")
    assert found["monitor.window_lastn"].endswith("did you mean 'window_last_n'?")
    assert found["monitor.colour"] == "unknown key (not a shrinkflow parameter)"


def test_a_key_of_another_section_says_where_it_belongs(raw):
    """A newcomer's run: a distill step's key put on the candidate itself was
    called "not a shrinkflow parameter" with itself as the suggestion."""
    raw["compress"]["candidates"][1]["warm_start_window_augment_copies"] = 1
    raw["monitor"]["epochs"] = 2
    found = problems(raw)
    assert found["compress.candidates.1.warm_start_window_augment_copies"] == (
        "not a key of this section: 'warm_start_window_augment_copies' belongs in a 'distill' step")
    assert found["monitor.epochs"].startswith("not a key of this section: 'epochs' belongs in ")
    assert found["monitor.epochs"].endswith("belongs in a 'distill' step or frontier.small_direct or train")
    # a gate put in the validate section itself: named by its key path, as the error paths are
    raw["validate"]["max_accuracy_drop_vs_production"] = 0.01
    assert problems(raw)["validate.max_accuracy_drop_vs_production"] == (
        "not a key of this section: 'max_accuracy_drop_vs_production' belongs in validate.gates")


@pytest.mark.parametrize("section", ["monitor", "distill step", "candidate"])
def test_every_key_of_another_section_names_a_section_that_has_it(raw, section):
    """The whole kind: every key any section may hold, put where it does
    not belong (the monitor section, the default student's distill step, a
    candidate), is named with the sections it belongs in, and each of those
    really holds it."""
    import shrinkflow.config as config

    models = {obj.__name__: obj for obj in vars(config).values()
              if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj.__module__ == config.__name__}
    steps = {m.model_fields["method"].default: m for m in models.values()
             if "method" in m.model_fields and isinstance(m.model_fields["method"].default, str)}
    keys = {field.alias or name for m in models.values() for name, field in m.model_fields.items()}
    target, model, prefix = {
        "monitor": (raw["monitor"], config.MonitorParams, "monitor"),
        "distill step": (raw["compress"]["candidates"][1]["recipe"][0], config.DistillStep,
                         "compress.candidates.1.recipe.0"),
        "candidate": (raw["compress"]["candidates"][1], config.Candidate, "compress.candidates.1"),
    }[section]
    own = {field.alias or name for name, field in model.model_fields.items()}
    placed = sorted(keys - own)
    for key in placed:
        target[key] = 1
    found = problems(raw)
    for key in placed:
        msg = found[f"{prefix}.{key}"]
        assert msg.startswith(f"not a key of this section: {key!r} belongs in "), msg
        homes = msg.split(" belongs in ", 1)[1].split(" or ")
        for home in homes:
            # a step by its method; a section by its key path: one of the models params.yaml holds there
            holders = ([steps[home.split("'")[1]]] if home.startswith("a '") else [config.Params]
                       if home == config.TOP_LEVEL else
                       [models[name] for name, paths in config.section_paths().items() if home in paths])
            assert holders and any(key in {f.alias or n for n, f in h.model_fields.items()} for h in holders), \
                (key, home)


def test_wrong_type_is_named(raw):
    raw["train"]["batch_size"] = "thirty-two"
    assert "integer" in problems(raw)["train.batch_size"]
    assert problems(raw)["train.batch_size"].endswith("(got 'thirty-two')")   # the value as typed


def test_out_of_range_value_is_named(raw):
    raw["validate"]["gates"]["min_accuracy"] = 1.5
    assert "less than or equal to 1 (got 1.5)" in problems(raw)["validate.gates.min_accuracy"]


def test_an_epoch_count_no_run_would_finish_is_refused(raw):
    """A helper's finding: `train.epochs: 1000000000000` passed validation
    and `run` started a training that would never end."""
    from shrinkflow.config import MAX_EPOCHS

    raw["train"]["epochs"] = 10 ** 12
    raw["compress"]["candidates"][1]["recipe"][0]["epochs"] = MAX_EPOCHS + 1
    found = problems(raw)
    assert f"less than or equal to {MAX_EPOCHS} (got 1000000000000)" in found["train.epochs"]
    assert f"less than or equal to {MAX_EPOCHS}" in found["compress.candidates.1.recipe.0.epochs"], found
    raw["train"]["epochs"] = raw["compress"]["candidates"][1]["recipe"][0]["epochs"] = MAX_EPOCHS
    assert parse_params(raw).train.epochs == MAX_EPOCHS
    # and the timing loops (a helper's finding: iters_b1 1e12 passed)
    raw["validate"]["latency"].update({"iters_b1": 10 ** 12, "rounds": 10 ** 6})
    found = problems(raw)
    assert "less than or equal to 100000 (got 1000000000000)" in found["validate.latency.iters_b1"], found
    assert "less than or equal to 1000 (got 1000000)" in found["validate.latency.rounds"], found


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_named_as_not_finite(raw, value):
    """A newcomer's `.nan` was refused as "less than or equal to 1 (got nan)",
    which reads as if nan were too big; and `.inf` would pass a bound-free
    float. Both are "not a finite number", whatever the field's range."""
    raw["validate"]["gates"]["max_accuracy_drop_vs_production"] = value
    raw["train"]["learning_rate"] = value
    found = problems(raw)
    assert "finite number" in found["validate.gates.max_accuracy_drop_vs_production"]
    assert "finite number" in found["train.learning_rate"]


@pytest.mark.parametrize("section, key, value, says", [
    ("latency", "retimes_when_busy", -1, "greater than or equal to 0"),
    ("latency", "retimes_when_busy", 1.5, "integer"),
    ("latency", "retimes_when_busy", "twice", "integer"),
    ("latency", "busy_retime_wait_s", -0.5, "greater than or equal to 0"),
    ("latency", "busy_retime_wait_s", float("nan"), "finite number"),
    ("latency", "busy_retime_wait_s", "ten", "number"),
    ("gates", "max_timing_other_cpu_share", 1.01, "less than or equal to 1"),
    ("gates", "max_timing_other_cpu_share", -0.1, "greater than or equal to 0"),
    ("gates", "max_timing_other_cpu_share", float("inf"), "finite number"),
    ("gates", "max_timing_other_cpu_share", "a quarter", "number"),
    ("gates", "max_timing_throttled_share", 1.5, "less than or equal to 1"),
    ("gates", "max_timing_throttled_share", -0.01, "greater than or equal to 0"),
    ("gates", "max_timing_throttled_share", float("nan"), "finite number"),
    ("gates", "max_timing_throttled_share", "some", "number"),
    ("gates", "max_timing_cpu_wait_share", 1.2, "less than or equal to 1"),
    ("gates", "max_timing_cpu_wait_share", -0.5, "greater than or equal to 0"),
    ("gates", "max_timing_cpu_wait_share", float("-inf"), "finite number"),
    ("gates", "max_timing_cpu_wait_share", "low", "number"),
])
def test_bad_timing_params_are_named(raw, section, key, value, says):
    raw["validate"][section][key] = value
    assert says in problems(raw)[f"validate.{section}.{key}"]


@pytest.mark.parametrize("value, says", [
    (-1, "greater than or equal to 0"), (-0.01, "greater than or equal to 0"), (float("inf"), "finite number"),
    (float("nan"), "finite number"), ("half an hour", "number"), ([30], "number"), (None, "number"),
])
def test_a_bad_scheduled_wait_is_named(raw, value, says):
    """monitor.scheduled_wait_minutes, over the kinds of bad value; 0 (fail
    at once) and a fraction of a minute are fine."""
    raw["monitor"]["scheduled_wait_minutes"] = value
    assert says in problems(raw)["monitor.scheduled_wait_minutes"]
    for fine in (0, 0.1, 1440):
        raw["monitor"]["scheduled_wait_minutes"] = fine
        assert parse_params(raw).monitor.scheduled_wait_minutes == fine


@pytest.mark.parametrize("key, value", [
    *(("warm_start_average_last", v) for v in (-0.1, 1.0, 1, 2, float("nan"), "0.5", None, [0.5], True)),
    *(("warm_start_soup", v) for v in (0, 9, -1, 1.5, "2", None, [2], True)),
    *(("warm_start_learning_rate", v) for v in (0, 0.0, -1e-4, 1.0, 2, float("nan"), float("inf"), "fast", [1e-4],
                                               True)),
    *(("warm_start_alpha_kl", v) for v in (-0.1, 1.1, 2, float("nan"), "soft", [0.5], {})),
])
def test_a_bad_averaging_soup_or_rate_of_a_warm_re_distillation_is_named(raw, key, value):
    """The distill step's warm_start_average_last (a share of the steps in
    [0, 1)), warm_start_soup (1 to 8 students) and warm_start_learning_rate
    (in (0, 1), or null), over the kinds of bad value; each refusal names
    the step's path."""
    step = raw["compress"]["candidates"][1]["recipe"][0]
    assert step["method"] == "distill"
    step[key] = value
    assert any(path.startswith("compress.candidates.1.recipe.0") and key in path for path in problems(raw)), \
        problems(raw)
    fines = {"warm_start_average_last": (0.0, 0.5, 0.99), "warm_start_soup": (1, 2, 8),
             "warm_start_learning_rate": (None, 1e-5, 2e-4, 0.5), "warm_start_alpha_kl": (None, 0.0, 0.5, 1.0)}
    for fine in fines[key]:
        step[key] = fine
        assert getattr(parse_params(raw).compress.candidates[1].recipe[0], key) == fine


def test_unsupported_quantization_bits_is_named(raw):
    raw["compress"]["candidates"][0]["recipe"][0]["bits"] = 4
    assert "compress.candidates.0.recipe.0.bits" in problems(raw)


@pytest.mark.parametrize("value", ["rows", "channel", "", None, 1, True, ["row"], {"row": 1}])
def test_a_bad_embedding_scales_is_named_and_row_needs_quantized_embeddings(raw, value):
    """The quantize step's embedding_scales: tensor or row; anything else is
    named with the step's path, and row with quantize_embeddings false (the
    tables stay fp32: nothing to scale per row) says so."""
    step = raw["compress"]["candidates"][0]["recipe"][0]
    assert step["method"] == "quantize"
    step["embedding_scales"] = value
    assert "compress.candidates.0.recipe.0.embedding_scales" in problems(raw), problems(raw)
    step["embedding_scales"], step["quantize_embeddings"] = "row", False
    says = " ".join(problems(raw).values())
    assert "embedding_scales: row" in says and "quantize_embeddings is false" in says, says
    for fine in ("tensor", "row"):
        step["embedding_scales"], step["quantize_embeddings"] = fine, True
        assert parse_params(raw).compress.candidates[0].recipe[0].embedding_scales == fine


def test_a_missing_section_reads_its_defaults_and_a_missing_required_key_is_named(raw):
    """Every section has its defaults (a params file may hold only what it
    changes); a key without a default is still named when missing."""
    from shrinkflow.config import DeployParams

    del raw["deploy"]
    assert parse_params(raw).deploy == DeployParams()
    raw["data"]["source"] = {"kind": "files"}
    assert "missing" in problems(raw)["data.source.path"]


def test_union_tag_is_hidden_from_key_path(raw):
    raw["train"]["model"] = {"kind": "random", "hidden_size": "big"}
    assert "train.model.hidden_size" in problems(raw)


def test_cross_field_rules(raw):
    bad = copy.deepcopy(raw)
    bad["data"]["test_fraction"] = bad["data"]["val_fraction"] = bad["data"]["reference_fraction"] = 0.35
    assert "under 10%" in problems(bad)["data"]
    bad = copy.deepcopy(raw)
    bad["compress"]["candidates"].append(copy.deepcopy(bad["compress"]["candidates"][0]))
    assert "unique" in problems(bad)["compress"]
    bad = copy.deepcopy(raw)
    bad["train"]["model"] = {"kind": "random", "hidden_size": 30, "num_heads": 4}
    assert "divisible" in problems(bad)["train.model"]


def test_not_a_mapping_and_bad_files(tmp_path):
    with pytest.raises(ParamsError, match="mapping"):
        parse_params([1, 2])
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as info:
        load_params(broken)
    # the file is named where the error is, not ruamel's "<unicode string>"; each line number once
    assert f'in "{broken}", line' in str(info.value) and "<unicode string>" not in str(info.value)
    assert "(line: " not in str(info.value)


def test_digest_is_stable_and_sensitive(raw):
    a = parse_params(raw).digest()
    assert a == parse_params(copy.deepcopy(raw)).digest()
    step = raw["compress"]["candidates"][0]["recipe"][0]
    step["per_channel"] = not step["per_channel"]
    assert parse_params(raw).digest() != a


def test_a_distilled_layer_the_teacher_does_not_have_is_refused_for_every_teacher_kind(raw):
    """Before this, only a local checkpoint's layers were checked: [0, 2, 9]
    on the packaged 6-layer MiniLM passed and compress crashed with an
    IndexError (a newcomer's run). The boundary: the last layer passes."""
    import json

    from shrinkflow.config import PretrainedModel
    from shrinkflow.modeling import teacher_source_dir

    config = json.loads((teacher_source_dir() / "config.json").read_text())
    assert PretrainedModel.NUM_LAYERS == config["num_hidden_layers"] == 6

    def with_layers(layers, model=None):
        r = copy.deepcopy(raw)
        step = next(s for c in r["compress"]["candidates"] for s in c["recipe"] if s["method"] == "distill")
        step["layers"] = layers
        if model:
            r["train"]["model"] = model
        return r

    parse_params(with_layers([0, 2, 5]))           # the last of 6: fine
    why = problems(with_layers([0, 2, 6]))["<root>"]
    assert "distill.layers [0, 2, 6] out of range for the 6-layer teacher (pretrained): its layers are 0..5" in why
    random2 = {"kind": "random", "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    parse_params(with_layers([0, 1], random2))
    assert "for the 2-layer teacher (random): its layers are 0..1" in problems(with_layers([0, 2], random2))["<root>"]
    # as the user reads it: the check's own message, without pydantic's "Value error," or a "<root>:" key
    with pytest.raises(ParamsError) as info:
        parse_params(with_layers([0, 2, 6]))
    line = str(info.value).splitlines()[1]
    assert line.startswith("  candidate ") and "Value error" not in line and "<root>" not in line


def test_a_candidate_s_error_names_the_candidate_and_its_step(raw):
    """The key path stays the one `dvc exp run -S` takes; the message names
    the candidate (and the step) it points at, so a user need not count."""
    raw["compress"]["candidates"][1]["recipe"][0]["epochs"] = -1
    raw["compress"]["candidates"][1]["colour"] = "red"
    name, method = raw["compress"]["candidates"][1]["name"], raw["compress"]["candidates"][1]["recipe"][0]["method"]
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    text = str(info.value)
    assert f"  compress.candidates.1.recipe.0.epochs (candidate {name!r}, its {method!r} step): " in text, text
    assert f"  compress.candidates.1.colour (candidate {name!r}): unknown key" in text, text
    assert "compress.candidates.1.recipe.0.epochs" in dict(info.value.problems)


@pytest.mark.parametrize("value, key, message", [
    ([0.3, 1.2], "warm_start_interpolation.1", "Input should be less than 1 (got 1.2)"),
    (1.5, "warm_start_interpolation", "Input should be less than 1 (got 1.5)"),
    ("x", "warm_start_interpolation", "Input should be a number or a list (got 'x')"),
    ([0.3, "a"], "warm_start_interpolation.1", "Input should be a valid number (got 'a')"),
])
def test_a_number_or_list_key_says_what_is_wrong_with_the_value_not_pydantic_s_member_names(raw, value, key, message):
    """A newcomer's run: [0.3, 1.2] read "...warm_start_interpolation.constrained-float: Input should be a
    valid number", then the real problem under "tuple[constrained-float, ...].1"."""
    raw["compress"]["candidates"][1]["recipe"][0]["warm_start_interpolation"] = value
    found = problems(raw)
    assert found == {f"compress.candidates.1.recipe.0.{key}": message}, found


def test_a_null_section_reads_as_an_empty_one(raw):
    """A helper's finding: `data:` with nothing under it (or all of it
    commented out) was refused, "data: Input should be an object (got
    None)", where a section left out takes its defaults."""
    from shrinkflow.config import DataParams, Gates

    raw["data"] = None
    raw["validate"]["gates"] = None
    params = parse_params(raw)
    assert params.data == DataParams() and params.validate_.gates == Gates()
    raw["data"] = {"max_rows": None}             # None as a value stays a value
    assert parse_params(raw).data.max_rows is None
    raw["train"]["model"] = None                  # not a section of its own: still an error
    assert "train.model" in " ".join(problems(raw))
