"""The package's shape: the import graph is the table of contents, and every
file and function is small enough for a chapter to show.

`sdlearn.CHAPTERS` maps every module to its chapter. Each module is read with
`ast`, never imported, and held to these rules:

- it imports no module of a later chapter, at the top or inside a function
  (an import names a module: `from sdlearn.schedulers.ddpm import X` is
  chapter 05's module, though Python also runs the package's `__init__`);
- it imports no other module's private (`_underscored`) names;
- it imports inside a function only the optional libraries (diffusers,
  transformers), unless it is the CLI (`CLI`), which loads what a command needs;
- the file has at most 600 lines, a function at most 80 lines and at most 10
  parameters (configs instead).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sdlearn import CHAPTERS

PACKAGE = Path(__file__).resolve().parents[1] / "sdlearn"
OPTIONAL = ("diffusers", "transformers")
# the command line imports what a command needs when it runs, so that
# `sdlearn --help` answers at once
CLI = ("cli", "cli_parser")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 10

# What the rules do not hold yet, each a finding as the test words it (without
# its line number): empty, and the test fails when an entry is no longer needed,
# so that the list only shrinks.
KNOWN_EXCEPTIONS: tuple[str, ...] = ()


def module_name(path: Path) -> str:
    """sdlearn/schedulers/ddpm.py -> "schedulers.ddpm"; sdlearn/__init__.py ->
    "sdlearn"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "sdlearn"


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(module, name or None) for each thing the statement imports, modules by
    their full names. `from sdlearn import vae` imports the module sdlearn.vae;
    `from sdlearn.vae import VAEConfig`, the name VAEConfig of sdlearn.vae."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    found = []
    for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        if chapter_key(submodule) in CHAPTERS:
            found.append((submodule, None))
        else:
            found.append((node.module, alias.name))
    return found


def chapter_key(module: str) -> str | None:
    """sdlearn.schedulers.ddpm -> "schedulers.ddpm", the key of CHAPTERS; None
    for a module outside the package."""
    if module == "sdlearn":
        return "sdlearn"
    if module.startswith("sdlearn."):
        return module.removeprefix("sdlearn.")
    return None


def findings(name: str, path: Path) -> list[str]:
    """Every rule the module breaks, in words."""
    text = path.read_text()
    tree = ast.parse(text)
    qualified = "sdlearn" if name == "sdlearn" else f"sdlearn.{name}"
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_FILE_LINES:
        problems.append(f"{qualified} has {lines} lines (at most {MAX_FILE_LINES})")

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                check_function(child)
                visit(child, child.name)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                check_import(child, function)
            else:
                visit(child, function)

    def check_function(node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        where = f"{qualified}.{node.name} (line {node.lineno})"
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            problems.append(f"{where} has {length} lines (at most 80)")
        args = node.args
        names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        count = len([n for n in names if n not in ("self", "cls")])
        if count > MAX_PARAMETERS:
            problems.append(f"{where} has {count} parameters (at most 10)")

    def check_import(node: ast.Import | ast.ImportFrom, function: str | None) -> None:
        if isinstance(node, ast.ImportFrom) and node.level:
            problems.append(f"{qualified} uses a relative import")
            return
        who = qualified if function is None else f"{qualified}.{function}"
        for module, item in imported(node):
            inside = function is not None and name not in CLI
            if inside and module.split(".")[0] not in OPTIONAL:
                problems.append(f"{who} imports {module} inside a function")
            key = chapter_key(module)
            if key is None:
                continue
            if CHAPTERS[key] > CHAPTERS[name]:
                problems.append(
                    f"{who} imports {module} (chapter {CHAPTERS[key]:02d}) "
                    f"from chapter {CHAPTERS[name]:02d}"
                )
            if item is not None and item.startswith("_") and key != name:
                problems.append(f"{who} imports {item}, private to {module}")

    visit(tree, None)
    return problems


def all_findings() -> list[str]:
    found = []
    for name, path in modules().items():
        found += findings(name, path)
    return found


def without_lines(finding: str) -> str:
    """A finding without its "(line N)", so that the exceptions survive edits."""
    head, _, rest = finding.partition(" (line ")
    return head + rest.partition(")")[2] if rest else finding


def test_every_module_has_a_chapter():
    found = set(modules())
    assert sorted(found - set(CHAPTERS)) == [], "add them to sdlearn.CHAPTERS"
    assert sorted(set(CHAPTERS) - found) == [], "sdlearn.CHAPTERS names no file"
    assert all(0 <= chapter <= 10 for chapter in CHAPTERS.values())


def test_imports_follow_the_chapters_and_files_stay_small():
    found = [without_lines(f) for f in all_findings()]
    new = [f for f in found if f not in KNOWN_EXCEPTIONS]
    assert new == [], "the package's shape broke:\n" + "\n".join(new)
    stale = [e for e in KNOWN_EXCEPTIONS if e not in found]
    assert stale == [], "no longer needed; delete from KNOWN_EXCEPTIONS:\n" + (
        "\n".join(stale)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from sdlearn.unet import UNet\n",
            "sdlearn.vae imports sdlearn.unet (chapter 04) from chapter 02",
        ),
        (
            "def f():\n    from sdlearn import pipeline\n",
            "sdlearn.vae.f imports sdlearn.pipeline inside a function",
        ),
        (
            "from sdlearn.shapes import _RADII\n",
            "sdlearn.vae imports _RADII, private to sdlearn.shapes",
        ),
        (
            "def f(a, b, c, d, e, f, g, h, i, j, k):\n    pass\n",
            "sdlearn.vae.f (line 1) has 11 parameters (at most 10)",
        ),
        ("x = 1\n" * 601, "sdlearn.vae has 601 lines (at most 600)"),
    ],
)
def test_the_rules_see_what_they_are_for(tmp_path, source, expected):
    path = tmp_path / "vae.py"
    path.write_text(source)
    assert expected in findings("vae", path)
