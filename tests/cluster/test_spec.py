"""Job specs (cluster/spec.py): validation into frozen objects, errors that list the valid
keys, values and the plain-data form (overrides, files and factories: test_spec_loading.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from spec_data import raw_spec  # tests/cluster/spec_data.py

from cluster.probe_options import ALL_KINDS, OPTION_CHECKS, PROBE_OPTIONS
from cluster.spec import (
    JobSpec,
    SpecError,
    apply_overrides,
    load_spec,
    parse_spec,
)

TOP_KEYS = "name, model, data, probes, loss, precision, vector_dtype, hvp, mode, cluster, output, seed"


def with_change(change) -> dict:
    raw = raw_spec()
    change(raw)
    return raw


# --- a valid spec -----------------------------------------------------------------


def test_valid_spec_parses_into_frozen_objects():
    spec = parse_spec(raw_spec(precision="float64", mode="train", cluster={"num_workers": 4, "group_size": 2}, seed=3))
    assert isinstance(spec, JobSpec)
    assert spec.model.checkpoints == ("ckpts/a.safetensors",)
    assert spec.data.num_examples == 64 and spec.data.batch_size == 16
    assert [p.kind for p in spec.probes] == ["eigenvalues", "trace"]
    assert spec.cluster.num_workers == 4 and spec.cluster.group_size == 2
    assert (spec.precision, spec.mode, spec.seed, spec.loss) == ("float64", "train", 3, "cross_entropy")
    for obj, attr, value in [
        (spec, "name", "other"),
        (spec.model, "factory", "a:b"),
        (spec.data, "num_examples", 1),
        (spec.cluster, "num_workers", 8),
        (spec.probes[0], "kind", "trace"),
        (spec.output, "path", "elsewhere"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)


def test_defaults_and_resolved_probe_options():
    spec = parse_spec(raw_spec())
    assert spec.output.path == "results"
    assert spec.cluster.num_workers == 1 and spec.cluster.backend == "auto" and spec.cluster.group_size is None
    assert spec.probes[0].resolved() == {**PROBE_OPTIONS["eigenvalues"], "k": 3}
    assert spec.probes[1].resolved()["method"] == PROBE_OPTIONS["trace"]["method"]


def test_shorthand_forms_are_accepted():
    spec = parse_spec(with_change(lambda r: (r["model"].update(checkpoints="one.pt"), r.update(probes=["spectrum"]))))
    assert spec.model.checkpoints == ("one.pt",)
    assert spec.probes[0].kind == "spectrum" and spec.probes[0].options == {}


def test_loss_factory_mapping_is_accepted():
    spec = parse_spec(raw_spec(loss={"factory": "torch.nn:MSELoss", "kwargs": {}}))
    assert spec.loss["factory"] == "torch.nn:MSELoss"


# --- unknown keys list the valid ones ------------------------------------------------


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(SpecError, match=re.escape(f"unknown key 'probs'; valid keys: {TOP_KEYS}")):
        parse_spec(raw_spec(probs=[]))


def test_unknown_section_key_lists_the_sections_keys():
    raw = with_change(lambda r: r["data"].update(num_exmples=10))
    expected = (
        "unknown key 'data.num_exmples'; valid keys of data: factory, kwargs, num_examples, batch_size, eval_sets"
    )
    with pytest.raises(SpecError, match=re.escape(expected)):
        parse_spec(raw)


def test_several_unknown_keys_are_all_named():
    raw = with_change(lambda r: r["model"].update(gpu=1, cpu=2))
    with pytest.raises(
        SpecError, match=r"unknown keys 'model\.cpu', 'model\.gpu'; valid keys of model: factory, kwargs, checkpoints"
    ):
        parse_spec(raw)


@pytest.mark.parametrize("section", ["cluster", "output"])
def test_unknown_key_in_optional_section(section):
    with pytest.raises(SpecError, match=rf"unknown key '{section}\.bogus'; valid keys of {section}: "):
        parse_spec(raw_spec(**{section: {"bogus": 1}}))


def test_unknown_probe_option_lists_the_kinds_options():
    raw = with_change(lambda r: r["probes"][0].update(kk=2))
    expected = "unknown key 'probes[eigenvalues].kk'; valid keys of probes[eigenvalues]: k, which, tol, max_steps"
    with pytest.raises(SpecError, match=re.escape(expected)):
        parse_spec(raw)


@pytest.mark.parametrize(
    ("loss", "weighting"),
    [
        ("cross_entropy", "examples"),
        ("lm_cross_entropy", "tokens"),
        ({"factory": "a.b:c"}, "examples"),
        ({"factory": "a.b:c", "weighting": "tokens"}, "tokens"),
        ({"factory": "a.b:c", "kwargs": {}, "weighting": "examples"}, "examples"),
    ],
    ids=str,
)
def test_loss_weighting(loss, weighting):
    spec = parse_spec(raw_spec(loss=loss))
    assert spec.weighting == weighting
    assert parse_spec(spec.to_dict()).weighting == weighting


def test_bfloat16_precision_and_example_weighted_noise_are_valid():
    assert parse_spec(raw_spec(precision="bfloat16")).precision == "bfloat16"
    assert parse_spec(raw_spec(probes=[{"kind": "noise"}])).weighting == "examples"


def test_unknown_loss_factory_key_is_rejected():
    with pytest.raises(SpecError, match=r"unknown key 'loss\.args'; valid keys of loss: factory, kwargs, weighting"):
        parse_spec(raw_spec(loss={"factory": "a.b:c", "args": 1}))


# --- values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["data"].update(num_examples=-1), "data.num_examples must be a positive integer, got -1"),
        (lambda r: r["data"].update(num_examples=True), "data.num_examples must be a positive integer, got True"),
        (lambda r: r["data"].update(num_examples="64"), "data.num_examples must be a positive integer, got '64'"),
        (lambda r: r["data"].update(batch_size=0), "data.batch_size must be a positive integer, got 0"),
        (lambda r: r.update(cluster={"num_workers": 0}), "cluster.num_workers must be a positive integer, got 0"),
        (lambda r: r.update(cluster={"num_workers": 2.0}), "cluster.num_workers must be a positive integer, got 2.0"),
        (
            lambda r: r.update(cluster={"max_restarts": -1}),
            "cluster.max_restarts must be a non-negative integer, got -1",
        ),
        (
            lambda r: r.update(cluster={"cpus_per_worker": -1}),
            "cluster.cpus_per_worker must be a non-negative number, got -1",
        ),
        (
            lambda r: r.update(cluster={"gpus_per_worker": "one"}),
            "cluster.gpus_per_worker must be a non-negative number, got 'one'",
        ),
        (
            lambda r: r.update(cluster={"backend": "slurm"}),
            "cluster.backend must be one of auto, ray, process, local, got 'slurm'",
        ),
        (
            lambda r: r.update(precision="half"),
            "precision must be one of auto, float32, float64, bfloat16, float16, got 'half'",
        ),
        (lambda r: r.update(mode="weird"), "mode must be one of eval, train, got 'weird'"),
        (
            lambda r: r.update(loss="hinge"),
            "loss must be one of cross_entropy, mse, lm_cross_entropy, causal_lm, model or "
            "{factory: 'pkg.module:callable'}, got 'hinge'",
        ),
        (lambda r: r.update(loss={"kwargs": {}}), "loss.factory must be 'package.module:callable', got None"),
        (
            lambda r: r.update(loss={"factory": "a.b:c", "weighting": "sequences"}),
            "loss.weighting must be one of examples, tokens "
            "(tokens: the loss is a per-batch mean over targets != -100), got 'sequences'",
        ),
        (
            lambda r: r.update(loss="lm_cross_entropy", probes=[{"kind": "noise"}]),
            "probes[noise] computes per-example gradient statistics and has no token-weighted form; remove it from a "
            "job whose loss is weighted by tokens, or use weighting: examples",
        ),
        (
            lambda r: r["model"].update(factory="no_colon"),
            "model.factory must be 'package.module:callable', got 'no_colon'",
        ),
        (lambda r: r["model"].update(factory="a:b:c"), "model.factory must be 'package.module:callable', got 'a:b:c'"),
        (
            lambda r: r["data"].update(factory=":digits"),
            "data.factory must be 'package.module:callable', got ':digits'",
        ),
        (lambda r: r["model"].update(kwargs=[1]), "model.kwargs must be a mapping, got [1]"),
        (lambda r: r["model"].update(checkpoints=[]), "model.checkpoints is empty"),
        (lambda r: r.update(probes=[]), "probes is empty"),
        (lambda r: r.update(probes={"kind": "trace"}), "probes must be a list"),
        (lambda r: r["probes"].append(5), "probes[2] must be a mapping with a 'kind', got 5"),
        (lambda r: r["probes"].append({"k": 1}), "probes[2] must be a mapping with a 'kind'"),
        (
            lambda r: r.update(name=""),
            "name must start with a letter and use letters, digits, '.', '_', '-' or spaces, got ''",
        ),
        (lambda r: r.update(seed=1.5), "seed must be an integer, got 1.5"),
        (lambda r: r.update(model=["x"]), "model must be a mapping, got ['x']"),
        (lambda r: r.update(data="digits"), "data must be a mapping, got 'digits'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_values_are_rejected_naming_the_key(change, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(with_change(change))


def test_group_size_must_divide_num_workers():
    with pytest.raises(SpecError, match=re.escape("cluster.num_workers=3 is not a multiple of cluster.group_size=2")):
        parse_spec(raw_spec(cluster={"num_workers": 3, "group_size": 2}))
    assert parse_spec(raw_spec(cluster={"num_workers": 4, "group_size": 2})).cluster.group_size == 2


@pytest.mark.parametrize("key", ["name", "model", "data", "probes"])
def test_missing_required_top_level_key(key):
    raw = raw_spec()
    del raw[key]
    with pytest.raises(SpecError, match=re.escape(f"spec is missing the required key {key!r}")):
        parse_spec(raw)


def test_missing_required_section_key():
    raw = raw_spec()
    del raw["data"]["factory"]
    with pytest.raises(SpecError, match=re.escape("data is missing required key(s): data.factory")):
        parse_spec(raw)


def test_model_needs_exactly_one_of_factory_and_hf():
    raw = raw_spec()
    del raw["model"]["factory"]
    with pytest.raises(SpecError, match=re.escape("model needs exactly one of model.factory")):
        parse_spec(raw)
    raw = raw_spec()
    raw["model"]["hf"] = "run"
    with pytest.raises(SpecError, match=re.escape("model needs exactly one of model.factory")):
        parse_spec(raw)


def test_hf_model_spec_defaults_and_checks():
    raw = raw_spec()
    raw["model"] = {"hf": "run"}
    spec = parse_spec(raw)
    assert spec.model.checkpoints == ("run",) and spec.model.hf_class == "auto" and spec.precision == "auto"
    assert spec.model.source == "hf:run"
    for bad, message in [
        ({"hf": "run", "hf_class": "seq2seq"}, "model.hf_class must be one of auto, causal_lm"),
        (
            {"hf": "run", "attn_implementation": "flash_attention_2"},
            "model.attn_implementation 'flash_attention_2' has no double backward (Hessian-vector products need one); "
            "use sdpa (run with its math kernel) or eager",
        ),
        ({"hf": "run", "kwargs": {"width": 3}}, "model.kwargs applies to model.factory only"),
        (
            {"factory": "m:f", "checkpoints": ["a.pt"], "hf_class": "causal_lm"},
            "model.hf_class applies to model.hf models only",
        ),
    ]:
        raw["model"] = bad
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_spec(raw)
    raw["model"] = {"hf": "run"}
    raw["loss"] = "model"
    assert parse_spec(raw).loss == "model"
    raw["model"] = {"factory": "m:f", "checkpoints": ["a.pt"]}
    with pytest.raises(SpecError, match=re.escape("loss: model uses the loss a Hugging Face model returns")):
        parse_spec(raw)


def test_spec_that_is_not_a_mapping():
    with pytest.raises(SpecError, match="a spec must be a mapping of top-level keys, got list"):
        parse_spec([1, 2])


def test_unknown_probe_kind_lists_the_kinds():
    raw = with_change(lambda r: r["probes"].append({"kind": "hessian"}))
    expected = r"unknown probe kind 'hessian'; valid kinds: eigenvalues, trace, spectrum, sharpness, barrier"
    with pytest.raises(SpecError, match=expected):
        parse_spec(raw)


def test_every_kind_of_the_design_is_available_with_options():
    assert list(PROBE_OPTIONS) == list(ALL_KINDS)
    assert set(OPTION_CHECKS) == set(PROBE_OPTIONS)
    for kind, options in PROBE_OPTIONS.items():
        assert set(OPTION_CHECKS[kind]) == set(options), kind  # every option is validated


@pytest.mark.parametrize(
    "probe",
    [
        {"kind": "eigenvalues", "k": 0},
        {"kind": "eigenvalues", "which": "middle"},
        {"kind": "trace", "method": "exact"},
        {"kind": "spectrum", "runs": "ten"},
    ],
)
def test_bad_probe_option_values_are_rejected(probe):
    with pytest.raises(SpecError, match=rf"probes\[{probe['kind']}\]\."):
        parse_spec(raw_spec(probes=[probe]))


def write_with_tol(tmp_path, text: str) -> Path:
    """The minimal spec file with ``tol: <text>`` written verbatim into the eigenvalues probe."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw_spec()).replace("k: 3", f"k: 3\n  tol: {text}"))
    assert f"tol: {text}\n" in path.read_text()  # the YAML text itself, not a dumped float
    return path


@pytest.mark.parametrize("text, value", [("1e-8", 1e-8), ("1E5", 100000.0), ("3.0e-7", 3e-7), ("+2e0", 2.0)])
def test_exponent_notation_in_a_spec_file_is_a_float(tmp_path, text, value):
    """YAML 1.2 reads ``1e-8`` as a float; PyYAML's 1.1 rules need a dot and would give the string '1e-8'."""
    tol = load_spec(write_with_tol(tmp_path, text)).probes[0].resolved()["tol"]
    assert type(tol) is float and tol == value


def test_exponent_notation_in_a_set_override_is_a_float(tmp_path):
    path = write_with_tol(tmp_path, "0.001")
    for text, value in [("1e-8", 1e-8), ("1E5", 100000.0)]:
        tol = load_spec(path, [f"probes.0.tol={text}"]).probes[0].resolved()["tol"]
        assert type(tol) is float and tol == value
    matvecs = apply_overrides(raw_spec(), ["probes.1.matvecs=1e3"])["probes"][1]["matvecs"]
    assert type(matvecs) is float and matvecs == 1000.0


def test_a_negative_exponent_value_is_rejected_as_the_number_it_is(tmp_path):
    with pytest.raises(SpecError, match=r"probes\[eigenvalues\]\.tol must be a positive number, got -2500\.0$"):
        load_spec(write_with_tol(tmp_path, "-25e2"))


@pytest.mark.parametrize("text", ["1e-8x", "e-8", "1e"])
def test_exponent_lookalikes_stay_strings_and_are_rejected_naming_the_key(tmp_path, text):
    message = rf"probes\[eigenvalues\]\.tol must be a positive number, got '{text}'$"
    with pytest.raises(SpecError, match=message):
        load_spec(write_with_tol(tmp_path, text))
    with pytest.raises(SpecError, match=message):
        load_spec(write_with_tol(tmp_path, "0.001"), [f"probes.0.tol={text}"])


def test_data_kwargs_must_be_a_mapping():
    with pytest.raises(SpecError, match="data.kwargs must be a mapping"):
        parse_spec(with_change(lambda r: r["data"].update(kwargs=None)))


def test_output_path_must_be_a_string(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw_spec(output={"path": 5})))
    with pytest.raises(SpecError, match="output.path"):
        load_spec(path)


# --- plain-data form ----------------------------------------------------------------


def test_to_dict_round_trips_through_parse_spec(tmp_path):
    spec = parse_spec(
        raw_spec(
            loss={"factory": "torch.nn:MSELoss", "kwargs": {"reduction": "mean"}},
            cluster={"num_workers": 2, "backend": "process"},
            precision="float64",
            seed=5,
        )
    )
    data = spec.to_dict()
    assert parse_spec(data) == spec
    assert parse_spec(yaml.safe_load(yaml.safe_dump(data))) == spec  # plain data: survives YAML
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw_spec()))
    loaded = load_spec(path)
    assert parse_spec(loaded.to_dict()) == loaded


@pytest.mark.parametrize(
    "probe, message",
    [
        ({"adaptive_kind": "typical"}, "probes[sharpness].adaptive_kind must be 'worst' or 'average', got 'typical'"),
        ({"adaptive_p": 1}, "probes[sharpness].adaptive_p must be 2 or 'inf' (the L2 or L∞ ball of u), got 1"),
        (
            {"adaptive_kind": "average"},
            "probes[sharpness].adaptive_rho is required with adaptive_kind='average', adaptive_p=2",
        ),
        (
            {"adaptive_p": "inf"},
            "probes[sharpness].adaptive_rho is required with adaptive_kind='worst', adaptive_p='inf'",
        ),
    ],
)
def test_adaptive_sharpness_options_are_checked(probe, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw_spec(probes=[{"kind": "sharpness", **probe}]))


def test_adaptive_sharpness_defaults_are_asams_worst_case_l2():
    (p,) = parse_spec(raw_spec(probes=[{"kind": "sharpness"}])).probes
    assert {k: p.resolved()[k] for k in ("adaptive_kind", "adaptive_p", "adaptive_rho")} == {
        "adaptive_kind": "worst",
        "adaptive_p": 2,
        "adaptive_rho": 0.5,
    }
    # the radius is given: any kind and norm; without 'adaptive' in the measures none is needed
    parse_spec(
        raw_spec(probes=[{"kind": "sharpness", "adaptive_kind": "average", "adaptive_p": "inf", "adaptive_rho": 0.2}])
    )
    parse_spec(raw_spec(probes=[{"kind": "sharpness", "measures": ["keskar"], "adaptive_kind": "average"}]))
