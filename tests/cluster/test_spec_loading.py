"""Job specs (cluster/spec.py), continued: ``--set`` overrides, ``load_spec``'s files and
relative paths, and factory imports."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from spec_data import raw_spec  # tests/cluster/spec_data.py

from cluster.spec import SpecError, apply_overrides, import_factory, load_spec, parse_spec

# --- overrides ---------------------------------------------------------------------


def test_overrides_nested_list_index_and_yaml_typed_values():
    raw = apply_overrides(
        raw_spec(),
        [
            "probes.0.k=7",
            "data.kwargs.split=test",  # creates the missing mapping
            "cluster.num_workers=2",
            "precision=float64",
            "probes.1.matvecs=0.5",
            "model.kwargs.hidden=16",
            "data.eval_sets={}",
            "seed=11",
            "output.path=",  # empty value: the empty string
        ],
    )
    assert raw["probes"][0]["k"] == 7 and isinstance(raw["probes"][0]["k"], int)
    assert raw["data"]["kwargs"] == {"split": "test"}
    assert raw["cluster"] == {"num_workers": 2}
    assert raw["probes"][1]["matvecs"] == 0.5
    assert raw["model"]["kwargs"]["hidden"] == 16 and raw["seed"] == 11
    assert raw["data"]["eval_sets"] == {} and raw["output"]["path"] == ""
    raw.pop("output")
    spec = parse_spec(apply_overrides(raw, ["probes.1.matvecs=100", "cluster.backend=process", "mode=train"]))
    assert spec.probes[0].options["k"] == 7 and spec.probes[1].options["matvecs"] == 100
    assert spec.cluster.num_workers == 2 and spec.cluster.backend == "process" and spec.mode == "train"


def test_override_replaces_a_whole_list_item_and_value_types():
    raw = apply_overrides(raw_spec(), ["probes.1=spectrum", "model.checkpoints=[x.pt, y.pt]", "cluster.address=null"])
    spec = parse_spec(raw)
    assert spec.probes[1].kind == "spectrum" and spec.model.checkpoints == ("x.pt", "y.pt")
    assert spec.cluster.address is None


def test_override_then_validation_names_the_bad_key():
    with pytest.raises(SpecError, match="unknown key 'data.num_exmples'"):
        parse_spec(apply_overrides(raw_spec(), ["data.num_exmples=3"]))
    with pytest.raises(SpecError, match="cluster.num_workers must be a positive integer, got 'two'"):
        parse_spec(apply_overrides(raw_spec(), ["cluster.num_workers=two"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("noequals", "--set expects key.path=value, got 'noequals'"),
        ("=3", "--set expects key.path=value, got '=3'"),
        ("probes.5.k=1", "--set 'probes.5.k=1': '5' does not address an existing list item or mapping"),
        ("probes.x.k=1", "--set 'probes.x.k=1': 'x' does not address an existing list item or mapping"),
        ("probes.2=trace", "--set 'probes.2=trace': list index '2' out of range"),
        ("name.first=a", "--set 'name.first=a': cannot set a key inside str"),
        ("model.checkpoints.0.x=1", "--set 'model.checkpoints.0.x=1': cannot set a key inside str"),
    ],
)
def test_malformed_overrides_raise_clear_errors(override, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        apply_overrides(raw_spec(), [override])


def test_override_with_unparsable_yaml_value_is_a_spec_error():
    with pytest.raises(SpecError, match=r"data\.num_examples"):
        apply_overrides(raw_spec(), ["data.num_examples=[1, 2"])


def test_overrides_do_not_touch_the_caller_defaults():
    original = raw_spec()
    snapshot = copy.deepcopy(original)
    apply_overrides(copy.deepcopy(original), ["probes.0.k=9"])
    assert original == snapshot


# --- load_spec: files and paths -----------------------------------------------------


def test_load_spec_resolves_relative_paths_against_the_spec_folder(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    absolute = str(tmp_path / "abs.pt")
    path = folder / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            raw_spec(
                model={
                    "factory": "probe.models:digits_mlp",
                    "checkpoints": ["ckpts/a.pt", "ckpts/*.safetensors", absolute],
                },
                output={"path": "out/results"},
            )
        )
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    spec = load_spec(Path("jobs") / "spec.yaml")
    base = folder.resolve()
    assert spec.model.checkpoints == (str(base / "ckpts/a.pt"), str(base / "ckpts/*.safetensors"), absolute)
    assert spec.output.path == str(base / "out/results")
    default = folder / "default.yaml"
    default.write_text(yaml.safe_dump(raw_spec()))
    assert load_spec(default).output.path == str(base / "results")


def test_load_spec_applies_overrides_before_validation(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw_spec(cluster={"num_workers": 0})))
    with pytest.raises(SpecError, match="cluster.num_workers must be a positive integer, got 0"):
        load_spec(path)
    spec = load_spec(path, ["cluster.num_workers=2", f"output.path={tmp_path / 'elsewhere'}"])
    assert spec.cluster.num_workers == 2 and spec.output.path == str(tmp_path / "elsewhere")


def test_load_spec_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match=r"spec file '.*nope\.yaml' not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"spec file '.*bad\.yaml' is not valid YAML"):
        load_spec(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="a spec must be a mapping of top-level keys, got NoneType"):
        load_spec(empty)


# --- factories ----------------------------------------------------------------------


def test_import_factory_returns_the_callable():
    from probe.models import digits_mlp

    assert import_factory("probe.models:digits_mlp") is digits_mlp


def test_import_factory_missing_module_names_key_and_module():
    with pytest.raises(SpecError, match=r"^model\.factory: cannot import module 'no_such_pkg\.mod' .*check the path"):
        import_factory("no_such_pkg.mod:make", key="model.factory")


def test_import_factory_missing_attribute_names_key_module_and_attribute():
    with pytest.raises(SpecError, match=re.escape("data.factory: module 'probe.models' has no attribute 'nope'")):
        import_factory("probe.models:nope", key="data.factory")
