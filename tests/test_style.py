"""House rules the code keeps (style.md): functions of at most 40 lines, lines of at most 120 characters."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "qat").rglob("*.py")) + sorted(ROOT.glob("*.py"))
MAX_FUNCTION, MAX_LINE = 40, 120


def test_no_function_over_40_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_line_over_120_characters():
    wide = [f"{path.relative_to(ROOT)}:{i}" for path in SOURCES
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not wide, wide
