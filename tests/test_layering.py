"""probe/ is pure math (docs/style.md, point 2; docs/design.md, "Layers").

It never imports the world's packages nor opens files.
"""

import ast
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "probe"
FORBIDDEN = {"ray", "pyarrow", "prometheus_client", "cluster"}


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in FORBIDDEN]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in FORBIDDEN:
            found.append(node.module)
        elif isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == "open")
            or (isinstance(node.func, ast.Attribute) and node.func.attr in {"open", "read_text", "write_text"})
        ):
            found.append(f"{ast.unparse(node.func)}( at line {node.lineno}")
    return found


@pytest.mark.parametrize("path", sorted(PROBE.rglob("*.py")), ids=lambda p: str(p.relative_to(PROBE)))
def test_probe_module_is_pure(path):
    assert violations(path.read_text()) == []


def test_checker_catches_each_kind():
    bad = "import ray.util\nfrom pyarrow import parquet\nimport prometheus_client as pc\n"
    bad += "from cluster.data import x\nopen('f')\n"
    assert violations(bad) == ["ray.util", "pyarrow", "prometheus_client", "cluster.data", "open( at line 5"]
    assert (PROBE / "hessian.py").is_file()  # the walk above is not silently empty
