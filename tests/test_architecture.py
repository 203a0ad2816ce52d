"""Imports run one way, and the README's "## Architecture" table is their order.

Every module of the package is parsed with `ast` (nothing is imported): each `pipeline/*.py`, and each subpackage as
one unit named by its folder (`pipeline/tiny_conceptclip/`; imports between its own files are its business). Every
import of a pipeline module counts, at the top of a module and inside functions alike, relative (`from .x import y`,
`from . import x`) or absolute (`import pipeline.x`, `from pipeline.x import y`).

The table names the modules in its first column, in order; a row that names several (`pipeline/demo.py`,
`pipeline/tiny.py`) gives them one rank. A module may import modules of its own rank or earlier rows, never a later
one, so the imports have no cycle. Only cli.py imports cli: every command lives there.

`pipeline/__init__.py` is exempt: it is the public facade (`pipeline.read_features`, `open_features`, `top_k`), above
every module, and imports them lazily inside its functions. Being above them, it is imported by none: a module that
wrote `from pipeline import read_features` (or `from . import top_k`) would go through the facade to a later module,
and fails here.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
FACADE = "pipeline/__init__.py"


@dataclass(frozen=True)
class Import:
    source: str  # the importing unit, e.g. pipeline/rescore.py
    file: str  # the file that holds the import statement
    line: int
    module: str  # the dotted name imported, e.g. pipeline.run
    target: str | None  # the unit it names; None: no such module


def unit_of(dotted: str) -> str | None:
    """The unit a dotted module name belongs to: `pipeline/x.py`, `pipeline/sub/`, the facade, or None."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return FACADE
    if (ROOT / PACKAGE / parts[1]).is_dir():
        return f"{PACKAGE}/{parts[1]}/"
    if (ROOT / PACKAGE / f"{parts[1]}.py").is_file() and len(parts) == 2:
        return f"{PACKAGE}/{parts[1]}.py"
    return None


def is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_files() -> dict[Path, str]:
    """Every .py file of the package and the unit it belongs to."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT)
        if "__pycache__" in rel.parts:
            continue
        files[path] = rel.as_posix() if len(rel.parts) == 2 else f"{rel.parts[0]}/{rel.parts[1]}/"
    return files


def imports_of(path: Path, unit: str) -> list[Import]:
    """The imports of pipeline modules in one file of the package, wherever they stand in it."""
    return imports_in(path.read_text(), path.relative_to(ROOT), unit)


def imports_in(source: str, rel: Path, unit: str) -> list[Import]:
    """The imports of pipeline modules in source text that stands at rel (a path relative to the repository)."""
    package = list(rel.parent.parts)  # the package the file is in, e.g. ["pipeline", "tiny_conceptclip"]
    found: list[Import] = []

    def add(dotted: str, line: int, target: str | None = None) -> None:
        if dotted.split(".")[0] == PACKAGE:
            found.append(Import(unit, rel.as_posix(), line, dotted, target or unit_of(dotted)))

    for node in ast.walk(ast.parse(source, filename=str(rel))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                assert base, f"{rel}:{node.lineno}: a relative import above the package"
                base_name = ".".join(base)
                dotted = f"{base_name}.{node.module}" if node.module else base_name
            else:
                dotted = node.module or ""
            if unit_of(dotted) == FACADE:
                # `from . import x`, `from pipeline import x`: x is a submodule, or a name of the facade
                for alias in node.names:
                    name = f"{dotted}.{alias.name}"
                    add(name, node.lineno, None if is_module(name) else FACADE)
            else:
                add(dotted, node.lineno)
    return sorted(found, key=lambda i: i.line)


def all_imports() -> list[Import]:
    return [imp for path, unit in package_files().items() for imp in imports_of(path, unit)]


def architecture_table() -> list[list[str]]:
    """The module paths of the README's architecture table, row by row, in order."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Architecture\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Architecture' section"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the Architecture section has no table"
    table = []
    for row in rows[2:]:  # after the header and the --- line
        first_cell = row.strip("|").split("|")[0]
        names = re.findall(r"`(pipeline/[^`]+)`", first_cell)
        assert names, f"README architecture row names no pipeline module: {row}"
        table.append(names)
    return table


def ranks() -> dict[str, int]:
    rank: dict[str, int] = {}
    for i, names in enumerate(architecture_table()):
        for name in names:
            assert name not in rank, f"README architecture table names {name} twice"
            rank[name] = i
    return rank


def test_the_table_names_every_module_and_only_modules_that_exist():
    table = set(ranks())
    units = set(package_files().values()) - {FACADE}
    assert not units - table, f"modules missing from README.md's architecture table: {sorted(units - table)}"
    assert not table - units, f"README.md's architecture table names modules that do not exist: {sorted(table - units)}"
    assert FACADE not in table, f"{FACADE} is the facade, above every module: leave it out of the table"


def test_every_import_names_a_module_that_exists():
    missing = [
        f"{i.file}:{i.line}: imports {i.module}, which is no module of the package"
        for i in all_imports()
        if i.target is None
    ]
    assert not missing, "\n".join(missing)


def test_no_module_imports_a_later_one():
    rank = ranks()
    wrong = []
    for i in all_imports():
        if i.source == FACADE or i.target is None or i.target == i.source:
            continue
        if i.target != FACADE and (i.source not in rank or i.target not in rank):
            continue  # test_the_table_names_every_module_and_only_modules_that_exist says which
        if i.target == FACADE:
            wrong.append(
                f"{i.file}:{i.line}: {i.source} imports {i.module} through the package's facade "
                f"({FACADE}); import the module that defines it"
            )
        elif rank[i.target] > rank[i.source]:
            wrong.append(
                f"{i.file}:{i.line}: {i.source} imports {i.module}, which README.md's architecture table "
                f"lists after it (row {rank[i.target] + 1} > row {rank[i.source] + 1})"
            )
    assert not wrong, "imports against the README's architecture order:\n" + "\n".join(wrong)


def test_only_cli_imports_cli():
    wrong = [
        f"{i.file}:{i.line}: imports {i.module}"
        for i in all_imports()
        if i.target == "pipeline/cli.py" and i.source != "pipeline/cli.py"
    ]
    assert not wrong, "the library modules never import the command line:\n" + "\n".join(wrong)


def test_every_command_is_defined_in_cli():
    """Parsers and command functions live in cli.py: no other module builds an argparse parser."""
    wrong = []
    for path, unit in package_files().items():
        if unit == "pipeline/cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_parser", "add_subparsers", "add_argument")
            ):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.func.attr}(...)")
    assert not wrong, "command-line parsing outside cli.py:\n" + "\n".join(wrong)


def test_the_collector_sees_imports_inside_functions_relative_absolute_and_through_the_facade():
    source = (
        "import numpy\nfrom .errors import UserError\n\n\ndef f():\n    from .cli import _echo\n"
        "    from . import run, top_k\n    import pipeline.report as r\n    from pipeline.read import x\n"
    )
    found = imports_in(source, Path("pipeline/labels.py"), "pipeline/labels.py")
    assert [(i.line, i.module, i.target) for i in found] == [
        (2, "pipeline.errors", "pipeline/errors.py"),
        (6, "pipeline.cli", "pipeline/cli.py"),
        (7, "pipeline.run", "pipeline/run.py"),
        (7, "pipeline.top_k", FACADE),
        (8, "pipeline.report", "pipeline/report.py"),
        (9, "pipeline.read", "pipeline/read.py"),
    ]
    sibling = imports_in(
        "from .configuration_conceptclip import C\n",
        Path("pipeline/tiny_conceptclip/modeling_conceptclip.py"),
        "pipeline/tiny_conceptclip/",
    )
    assert [(i.module, i.target) for i in sibling] == [
        ("pipeline.tiny_conceptclip.configuration_conceptclip", "pipeline/tiny_conceptclip/")
    ]


FAMILIES_UNIT = "pipeline/families/"
EXEMPT_FROM_FAMILY_CHECK = {FAMILIES_UNIT, "pipeline/tiny_conceptclip/"}  # the registry; a model's own remote code


def family_words() -> set[str]:
    """What a module would compare to tell families apart: each family's key (OUTPUT identities' `kind`) and the
    config.json model_type values the registry recognises."""
    from pipeline import families

    words = {family.name for family in families.FAMILIES}
    words |= {getattr(family, "model_type", None) for family in families.FAMILIES} - {None}
    return words | {"clip", "siglip", "clip_vision_model", "siglip_vision_model"}


def family_strings(source: str, words: set[str]) -> list[tuple[int, str]]:
    """(line, word) for every string literal in source that names a model family."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words
    ]


def test_only_the_family_registry_tells_model_families_apart():
    """A family's behaviour is asked of its adapter (`family.has_text`, `.remote_code`, `.probability`...); no module
    outside pipeline/families/ compares a family's name, so adding a family is one file and one registry line."""
    words = family_words()
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {word!r}"
        for path, unit in package_files().items()
        if unit not in EXEMPT_FROM_FAMILY_CHECK
        for line, word in family_strings(path.read_text(), words)
    ]
    assert not wrong, "model families told apart by name outside pipeline/families/:\n" + "\n".join(wrong)


def test_the_family_check_sees_comparisons_tuples_and_dict_keys():
    source = 'if spec.kind == "remote": pass\nx = kind in ("clip", "siglip")\ny = {"clip_vision": 1}[k]\n'
    assert [word for _, word in family_strings(source, family_words())] == ["remote", "clip", "siglip", "clip_vision"]


def test_help_loads_no_driver_or_analysis_module():
    """`featurize --help` builds every parser without importing what the commands run."""
    heavy = [
        "run",
        "run_slides",
        "read",
        "heatmap",
        "rescore",
        "labels",
        "probe",
        "report",
        "demo",
        "tiny",
        "plan",
        "summary",
        "vectors",
        "index",
        "gallery",
        "search",
        "dedup",
    ]
    code = (
        "import sys; from pipeline.cli import build_parser; build_parser(); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pipeline.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = set(loaded.stdout.split())
    assert not modules & {f"pipeline.{m}" for m in heavy}, sorted(modules)
