"""docs/architecture.md is the map a newcomer reads first: it stays true of the code. Every module it
names exists (and every `module.py: name` is defined there), every module of the packages is named in
it, and the layers it draws hold: each package imports only those below it, and no role another role."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# top to bottom, as the doc draws them; the three roles share one layer and never import each other
LAYERS = [{"tba"}, {"producers", "consumers", "trainer"}, {"policy"}, {"ops"}, {"schemas"}]
PACKAGES = set().union(*LAYERS)
GENERATED = re.compile(r"_pb2(_grpc)?\.py$")


def modules() -> list[Path]:
    return sorted(
        p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__init__.py" and not GENERATED.search(p.name) and "__pycache__" not in p.parts
    )


def layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def imported_packages(path: Path) -> set[str]:
    """The first-party packages a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PACKAGES


def test_every_module_the_doc_names_exists_with_the_names_it_gives():
    text = DOC.read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_0-9]+\.(?:py|avsc|proto))", text))
    assert named, "the doc names no module"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    undefined = []
    for path, names in re.findall(r"`((?:[a-z_]+/)+[a-z_0-9]+\.py): ([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*)`", text):
        source = (ROOT / path).read_text()
        for name in names.split(", "):
            last = name.split(".")[-1]
            if not re.search(rf"^\s*(?:async def|def|class) {last}\b|^{last}\s*[:=]", source, re.M):
                undefined.append(f"{path}: {name}")
    assert not undefined, f"docs/architecture.md names what the modules do not define: {undefined}"


def test_the_doc_names_every_module_of_the_packages():
    text = DOC.read_text()
    unnamed = [str(p.relative_to(ROOT)) for p in modules() if str(p.relative_to(ROOT)) not in text]
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_each_package_imports_only_the_layers_below_it_and_no_role_another():
    problems = []
    for path in modules():
        package = path.relative_to(ROOT).parts[0]
        for other in imported_packages(path) - {package}:
            if layer(other) <= layer(package):
                problems.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not problems, problems
