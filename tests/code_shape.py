"""The shape the product's code keeps (docs/design.md): module and function sizes, private names,
line packing. ``python tests/code_shape.py`` prints every breach; tests/test_code_shape.py fails on one."""

from __future__ import annotations

import ast
import os
import sys
from typing import Iterator, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sft_common", "sft_edge", "sft_cloud")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_FMT_SKIPS = 10  # for tables only


def product_modules() -> Iterator[Tuple[str, str]]:
    """(module name, path) of every product module but the generated protocol stubs."""
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in sorted(names):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)
                if not name.endswith(".py") or "_pb2" in name:
                    continue
                yield rel[:-3].replace(os.sep, ".").removesuffix(".__init__"), path


def breaches() -> List[str]:
    found, skips = [], 0
    for module, path in product_modules():
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, ROOT)
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            found.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        skips += text.count("# fmt: skip")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}: {size} lines (at most {MAX_FUNCTION_LINES})")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGES):
                if node.module == module:
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{rel}:{node.lineno} imports the private {node.module}.{alias.name}")
    if skips > MAX_FMT_SKIPS:
        found.append(f"{skips} '# fmt: skip' markers in the product (at most {MAX_FMT_SKIPS}, for tables)")
    return found


if __name__ == "__main__":
    problems = breaches()
    print("\n".join(problems) or "no breaches")
    sys.exit(1 if problems else 0)
