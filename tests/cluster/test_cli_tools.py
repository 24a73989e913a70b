"""``probe --version``, ``probe validate`` and ``probe schema`` (cluster/validate.py, cluster/spec_schema.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from cluster.cli import main
from cluster.demo import _specs as demo_specs
from cluster.kinds import KINDS
from cluster.spec import SpecError, load_spec, parse_spec
from cluster.spec_schema import SCHEMA_FILE, option_schema, spec_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / SCHEMA_FILE).read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "specs-configmap.yaml"


def test_version_names_the_installed_distribution_and_torch():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"landscape-probe {version('landscape-probe')}" in proc.stdout
    assert f"torch {torch.__version__}" in proc.stdout


def _validate(capsys, path, *sets) -> tuple[int, str, str]:
    rc = main(["validate", str(path), *(x for s in sets for x in ("--set", s))])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_validate_prints_the_resolved_spec_plan_and_estimate_and_runs_nothing(make_spec, capsys, tmp_path):
    path = make_spec(probes=[{"kind": "eigenvalues", "k": 2}], num_examples=64)
    rc, out, err = _validate(capsys, path)
    assert rc == 0, err
    resolved_text, plan = out.split("\n# plan: ")
    resolved = yaml.safe_load(resolved_text)
    # defaults filled in: every option of the kind, the sections' defaults
    assert resolved["probes"] == [{"kind": "eigenvalues", **KINDS["eigenvalues"].options, "k": 2}]
    assert resolved["cluster"]["max_restarts"] == 3 and resolved["data"]["batch_size"] == 50
    assert plan.startswith("2 checkpoint(s) × 1 probe(s) = 2 task(s); 0 stored, 2 to run")
    assert plan.count("  run      probes[0] eigenvalues  mlp-seed") == 2
    assert "# memory estimate" in plan and "parameters" in plan and "measured on one batch" in plan
    assert not (tmp_path / "results").exists(), "validate wrote results"

    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    rc, out, _ = _validate(capsys, path)
    assert rc == 0 and "= 2 task(s); 2 stored, 0 to run" in out
    assert out.count("  stored   probes[0] eigenvalues") == 2
    # an override changes the plan: another k is another task
    rc, out, _ = _validate(capsys, path, "probes.0.k=3")
    assert rc == 0 and "0 stored, 2 to run" in out


def test_validate_a_bad_spec_exits_2_with_one_line(make_spec, capsys):
    path = make_spec(probes=[{"kind": "eigenvalues", "which": "middle"}])
    rc, out, err = _validate(capsys, path)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "probe validate: probes[eigenvalues].which must be 'largest' or 'smallest', got 'middle'"
    ]
    rc, _, err = _validate(capsys, make_spec(model={"factory": "nowhere.mod:fn", "checkpoints": ["x"]}))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err


def test_schema_command_prints_the_checked_in_schema(capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == spec_schema() == SCHEMA, f"{SCHEMA_FILE} is stale: run `probe schema > {SCHEMA_FILE}`"
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(printed)


def _bank(words: str) -> list:
    quoted = [w for w in words.replace(",", " ").replace("'", " ").split() if w.isidentifier() or "+" in w]
    return [
        None, True, False, -1, 0, 1, 2, 3, 4, 5, 6, 7, 1000, 0.5, 1e-9, 0.999, 1.5, -0.5, "", "zz", "inf",
        [], ["zz"], ["zz", "zz"], {}, {"a": 1},
        *quoted, *([w] for w in quoted), *([w, w] for w in quoted),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_schema_and_the_parser_agree_on_every_probe_option(kind):
    for option, (check, words) in KINDS[kind].checks.items():
        schema = option_schema(kind, option)
        for value in _bank(words):
            if isinstance(value, float) and value.is_integer():
                continue  # JSON Schema counts 1.0 as an integer; YAML reads it as a float
            try:
                parser = bool(check(value))
            except Exception:
                parser = False
            if isinstance(value, bool) and parser and check(int(value)) and not check(not value):
                parser = False  # `v in (1, 2)` takes true for 1 (bool is an int in Python); the schema does not
            assert jsonschema.Draft202012Validator(schema).is_valid(value) == parser, (
                f"probes[{kind}].{option}={value!r}: parser says {parser}, schema {schema}"
            )


def _example_specs(tmp_path) -> dict[str, dict]:
    specs = {
        str(p.relative_to(ROOT)): yaml.safe_load(p.read_text()) for p in (ROOT / "docs" / "examples").rglob("*.yaml")
    }
    for key, text in yaml.safe_load(CONFIGMAP.read_text())["data"].items():
        specs[f"{CONFIGMAP.relative_to(ROOT)}:{key}"] = yaml.safe_load(text)
    out = tmp_path / "demo"
    a = [out / "checkpoints" / "run-a" / "step-0.safetensors"]
    b = [out / "checkpoints" / "run-b" / "step-800.safetensors"]
    for name, path in demo_specs(out, a, b, num_workers=2, seed=0).items():
        specs[f"demo:{name}"] = yaml.safe_load(path.read_text())
    return specs


def test_every_example_spec_validates_against_the_schema_and_loads(tmp_path):
    specs = _example_specs(tmp_path)
    assert any(k.startswith("docs/examples/") for k in specs) and len(specs) >= 5, sorted(specs)
    for where, raw in specs.items():
        errors = [e.message for e in VALIDATOR.iter_errors(raw)]
        assert not errors, f"{where}: {errors}"
        parse_spec(raw)


def test_example_spec_files_reference_the_schema_for_editors():
    files = list((ROOT / "docs" / "examples").rglob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        prefix = "# yaml-language-server: $schema="
        assert first.startswith(prefix), f"{path.relative_to(ROOT)}: first line must be `{prefix}...`"
        target = (path.parent / first[len(prefix) :]).resolve()
        assert target == (ROOT / SCHEMA_FILE).resolve(), f"{path.relative_to(ROOT)} points at {target}"
        load_spec(path)  # relative paths resolve; nothing else is needed to load it


BAD = {
    "unknown top-level key": lambda s: s.update(workers=2),
    "unknown probe option": lambda s: s["probes"][0].update(kk=1),
    "k = 0": lambda s: s["probes"][0].update(k=0),
    "which: middle": lambda s: s["probes"][0].update(which="middle"),
    "unknown kind": lambda s: s["probes"].append({"kind": "hessian"}),
    "precision float8": lambda s: s.update(precision="float8"),
    "no data": lambda s: s.pop("data"),
    "factory without ':'": lambda s: s["model"].update(factory="probe.models.digits_mlp"),
    "num_workers 0": lambda s: s.update(cluster={"num_workers": 0}),
    "odd pacbayes samples": lambda s: s["probes"].append({"kind": "pacbayes", "samples": 5}),
    "barrier with one endpoint": lambda s: s["probes"].append({"kind": "barrier", "between": ["a"]}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_spec_fails_the_schema_and_the_parser(case):
    raw = yaml.safe_load((ROOT / "docs" / "examples" / "digits.yaml").read_text())
    assert VALIDATOR.is_valid(raw)
    BAD[case](raw)
    assert not VALIDATOR.is_valid(raw), case
    with pytest.raises(SpecError):
        parse_spec(raw)
