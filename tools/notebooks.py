"""One source for every line of code: regenerate the notebooks from the package.

Data flows one way: sdlearn/*.py -> code cells of solutions/ -> chapters/.

1. Package cells. A code cell of a solution notebook whose first line is a header
   `# sdlearn/MODULE.py::NAME` shows the package's final code: the generator
   replaces the rest of the cell with the source of the top-level function or
   class NAME in that module (decorators included).
2. Exercises. In a solution's code cell, the lines between `# BEGIN SOLUTION`
   and `# END SOLUTION` (inside a function) are the answer. In a markdown cell,
   the text between `<!-- BEGIN SOLUTION -->` and `<!-- END SOLUTION -->` is.
   The solution cell is tagged `hide-input`, so the book shows it collapsed.
3. Chapters. chapters/NN_topic.ipynb is solutions/NN_topic.ipynb with every
   answer replaced by a stub (`# TODO` + `raise NotImplementedError`, or "Your
   answer here"), outputs cleared and the `hide-input` tags dropped.

Usage:
    python tools/notebooks.py build [--execute] [NAMES...]
        regenerate package cells and chapters; --execute re-runs the solution
        notebooks (all, or those whose names contain one of NAMES) and stores
        their outputs.
    python tools/notebooks.py check
        exit 1, naming every drifted cell, when regenerating would change a file,
        and every stored output line that prints floating-point noise (a
        difference or an error below 1e-4 rather than the bound it checks).

Nobody edits a package cell or a chapter by hand: edit sdlearn/ or solutions/.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
import textwrap
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

HEADER = re.compile(r"^# (sdlearn/[\w/]+\.py)::(\w+(?:\.\w+)?)\s*$")
CODE_BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
CODE_END = re.compile(r"^\s*# END SOLUTION\s*$")
MD_SOLUTION = re.compile(
    r"<!-- BEGIN SOLUTION -->.*?<!-- END SOLUTION -->", flags=re.DOTALL
)
MD_STUB = "*Your answer here.*"
SOLUTION_TAG = "hide-input"


class NotebookError(ValueError):
    """A notebook breaks the one-source rules; the message names file and cell."""


def object_source(root: Path, module: str, name: str) -> str:
    """The source of top-level function or class `name` in `root/module`, or of
    one method, `Class.method` (a listing can show a class's constructor alone
    when the learner writes its forward)."""
    path = root / module
    if not path.exists():
        raise NotebookError(f"{module} does not exist")
    text = path.read_text()
    body, where = ast.parse(text).body, "top-level function or class"
    *owner, name = name.split(".")
    if owner:
        classes = [
            n for n in body if isinstance(n, ast.ClassDef) and n.name == owner[0]
        ]
        if not classes:
            raise NotebookError(f"{module} has no top-level class {owner[0]!r}")
        body, where = classes[0].body, f"method in {owner[0]}"
    for node in body:
        is_def = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        if is_def and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = text.splitlines()[start - 1 : node.end_lineno]
            return textwrap.dedent("\n".join(lines))
    raise NotebookError(f"{module} has no {where} {name!r}")


def stub_code(source: str, where: str) -> str:
    """Replaces every `# BEGIN SOLUTION` ... `# END SOLUTION` region by a stub."""
    out: list[str] = []
    indent = None
    for line in source.splitlines():
        begin = CODE_BEGIN.match(line)
        if begin:
            if indent is not None:
                raise NotebookError(f"{where}: nested '# BEGIN SOLUTION'")
            indent = begin.group(1)
            if not indent:
                raise NotebookError(
                    f"{where}: a solution region must be inside a function, "
                    "so the unsolved chapter still runs"
                )
            out.append(f"{indent}# TODO: your code here")
            out.append(f"{indent}raise NotImplementedError")
        elif CODE_END.match(line):
            if indent is None:
                raise NotebookError(f"{where}: '# END SOLUTION' without a begin")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise NotebookError(f"{where}: '# BEGIN SOLUTION' is never closed")
    return "\n".join(out)


def has_solution(cell) -> bool:
    if cell.cell_type == "code":
        lines = cell.source.splitlines()
        return any(CODE_BEGIN.match(line) or CODE_END.match(line) for line in lines)
    if cell.cell_type == "markdown":
        return bool(MD_SOLUTION.search(cell.source))
    return False


def build_solution(nb, root: Path, name: str):
    """The solution notebook with package cells regenerated and tags set."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        if cell.cell_type == "code":
            first = cell.source.split("\n", 1)[0]
            match = HEADER.match(first)
            if match:
                module, obj = match.groups()
                try:
                    cell.source = first + "\n" + object_source(root, module, obj)
                except NotebookError as error:
                    raise NotebookError(f"{where}: {error}") from None
        tags = list(cell.metadata.get("tags", []))
        if cell.cell_type == "code" and has_solution(cell):
            stub_code(cell.source, where)  # validates the markers
            if SOLUTION_TAG not in tags:
                tags.append(SOLUTION_TAG)
        if tags:
            cell.metadata["tags"] = tags
    return nb


def build_chapter(solution):
    """The learner's notebook: answers stubbed, outputs cleared."""
    nb = copy.deepcopy(solution)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if has_solution(cell):
                cell.source = stub_code(cell.source, f"cell {i}")
                tags = [t for t in cell.metadata.get("tags", []) if t != SOLUTION_TAG]
                if tags:
                    cell.metadata["tags"] = tags
                else:
                    cell.metadata.pop("tags", None)
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = MD_SOLUTION.sub(MD_STUB, cell.source)
    return nb


def write_text(nb) -> str:
    return nbformat.writes(nb) + "\n"


def planned(root: Path) -> dict[Path, str]:
    """Every generated file's expected text, keyed by its path."""
    files: dict[Path, str] = {}
    for path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        name = f"solutions/{path.name}"
        solution = build_solution(nbformat.read(path, as_version=4), root, name)
        files[path] = write_text(solution)
        files[root / "chapters" / path.name] = write_text(build_chapter(solution))
    return files


def drift(root: Path) -> list[str]:
    """What differs between the files on disk and what the generator makes."""
    problems = []
    expected_files = planned(root)
    for path, text in expected_files.items():
        rel = path.relative_to(root)
        if not path.exists():
            problems.append(f"{rel} is missing")
        elif path.read_text() != text:
            problems += [f"{rel} {d}" for d in differences(path.read_text(), text)]
    stale = set((root / "chapters").glob("*.ipynb")) - set(expected_files)
    problems += [f"{p.relative_to(root)} has no solution notebook" for p in stale]
    return problems


def differences(actual: str, expected: str) -> list[str]:
    """The cells that differ between two notebooks' texts, in words."""
    a = nbformat.reads(actual, as_version=4)
    b = nbformat.reads(expected, as_version=4)
    if len(a.cells) != len(b.cells):
        return [f"has {len(a.cells)} cells, expected {len(b.cells)}"]
    found = []
    for i, (x, y) in enumerate(zip(a.cells, b.cells, strict=True)):
        if x != y:
            first_line = y.source.split("\n", 1)[0][:60]
            found.append(f"cell {i} differs ({first_line!r})")
    return found or ["differs in notebook metadata or formatting"]


# A line reports a comparison when it speaks of a difference or an error...
COMPARISON = re.compile(r"diff|error|deviat|drift|\|[^|\n]*\s-\s[^|\n]*\|", re.I)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d*)?(?:e[-+]?\d+)?", re.I)
# ...and a small number in it is a bound when one of these words comes just before
BOUND = re.compile(r"within|below|under|less than|at most|<|≤|atol|rtol|toleran|allow")
NOISE_BELOW = 1e-4


def noise_in(text: str) -> list[str]:
    """The lines of an output that print floating-point noise: a difference or
    an error below 1e-4, whose digits change with the CPU, the thread count and
    the library versions. A chapter prints the bound it asserts instead."""
    found = []
    for line in text.splitlines():
        if not COMPARISON.search(line):
            continue
        for number in NUMBER.finditer(line):
            value = float(number.group())
            before = line[max(0, number.start() - 25) : number.start()]
            if 0 < value < NOISE_BELOW and not BOUND.search(before.lower()):
                found.append(line.strip())
                break
    return found


def output_text(cell) -> str:
    """The text a code cell's stored outputs show (streams and plain text)."""
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


def noisy_outputs(root: Path) -> list[str]:
    """Every stored output line of solutions/ that prints floating-point noise."""
    problems = []
    for path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            for line in noise_in(output_text(cell)):
                problems.append(
                    f"solutions/{path.name} cell {i} prints floating-point noise "
                    f"({line[:70]!r}): print the bound it asserts instead"
                )
    return problems


def course_lines(root: Path) -> dict[str, tuple[int, int]]:
    """Per chapter, the lines the learner writes (between the answer markers of
    its solution) and the lines of package listings it shows (cells that start
    with a `# sdlearn/...` header)."""
    table = {}
    for path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        written = listed = 0
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            lines = cell.source.splitlines()
            if lines and HEADER.match(lines[0]):
                listed += len(lines) - 1
            inside = False
            for line in lines:
                if CODE_BEGIN.match(line):
                    inside = True
                elif CODE_END.match(line):
                    inside = False
                elif inside and line.strip():
                    written += 1
        table[path.stem] = (written, listed)
    return table


def lines_table(root: Path) -> str:
    """`course_lines` as the markdown table CONTRIBUTING shows."""
    rows = ["| chapter | lines you write | lines of listings |", "|---|---:|---:|"]
    table = course_lines(root)
    for name, (written, listed) in table.items():
        rows.append(f"| {name} | {written} | {listed} |")
    total_written = sum(w for w, _ in table.values())
    total_listed = sum(listed for _, listed in table.values())
    rows.append(f"| all | {total_written} | {total_listed} |")
    return "\n".join(rows)


LINES_BLOCK = re.compile(r"(<!-- lines -->\n)(?:.*?\n)?(<!-- /lines -->)", flags=re.S)


def lines_drift(root: Path) -> list[str]:
    """CONTRIBUTING's table of lines, if it is not the one the chapters give."""
    path = root / "CONTRIBUTING.md"
    text = path.read_text() if path.exists() else ""
    match = LINES_BLOCK.search(text)
    if match is None:
        return []
    expected = LINES_BLOCK.sub(lambda m: m[1] + lines_table(root) + "\n" + m[2], text)
    return [] if expected == text else ["CONTRIBUTING.md's table of lines is stale"]


def execute(path: Path, timeout: int = 600) -> float:
    """Runs a notebook top to bottom in a fresh kernel and stores its outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    seconds = time.perf_counter() - start
    path.write_text(write_text(nb))
    return seconds


def build(root: Path, run: list[str] | None) -> None:
    contributing = root / "CONTRIBUTING.md"
    if contributing.exists() and lines_drift(root):
        text = contributing.read_text()
        table = lines_table(root)
        table_block = LINES_BLOCK.sub(lambda m: m[1] + table + "\n" + m[2], text)
        contributing.write_text(table_block)
        print("wrote CONTRIBUTING.md's table of lines")
    for path, text in planned(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    if run is None:
        return
    for path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        if run and not any(name in path.name for name in run):
            continue
        seconds = execute(path)
        note = "  (over the 3-minute budget!)" if seconds > 180 else ""
        print(f"executed {path.relative_to(root)} in {seconds:.0f} s{note}")
    build(root, None)  # chapters follow the new solutions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--execute", action="store_true", help="re-run solutions")
    parser.add_argument("names", nargs="*", help="solutions to execute (substrings)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    try:
        if args.command == "build":
            build(args.root, args.names if args.execute else None)
            return 0
        problems = drift(args.root) + lines_drift(args.root)
        noise = noisy_outputs(args.root)
    except NotebookError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"drift: {problem}", file=sys.stderr)
    if problems:
        print(
            "run `make notebooks` to regenerate (never edit them by hand)",
            file=sys.stderr,
        )
    for problem in noise:
        print(f"noise: {problem}", file=sys.stderr)
    if problems or noise:
        return 1
    print("notebooks: no drift")
    return 0


if __name__ == "__main__":
    sys.exit(main())
