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
MAX_KIND_BRANCHES = 40  # in sft_edge and sft_cloud: the run's kind is asked of an object

# A branch on the run's kind: an if, ternary or filter whose test names one of these (or compares
# with one of the kinds' spellings), outside the functions that resolve a choice into its object
# (those are the seam) and outside checks that a flag names a known choice (``x not in CHOICES``).
KIND_NAMES = {
    "local",
    "label_private",
    "causal_lm",
    "lm_shape",
    "mode",
    "peft",
    "lora",
    "factorise",
    "problem",
    "part",
    "FFN_INPUT",
    "FFN_OUTPUT",
    "CAUSAL_LM",
    "EDGE",
    "FULL",
    "SPLIT",
    "USHAPE",
}
KIND_SPELLINGS = {
    "sft",
    "sl",
    "local",
    "ffn-input",
    "ffn-output",
    "causal-lm",
    "lora",
    "edge",
    "full",
    "ushape",
    "split",
}
RESOLVERS = {"kind_of", "kind_of_record", "problem_of", "cut_of", "session_class", "resolved", "tail_end_of"}


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


def _names_a_kind(test: ast.expr) -> bool:
    if isinstance(test, ast.Compare) and all(isinstance(op, (ast.In, ast.NotIn)) for op in test.ops):
        return False  # a flag checked against its choices
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute) and node.attr in KIND_NAMES:
            return True
        if isinstance(node, ast.Name) and node.id in KIND_NAMES:
            return True
        if isinstance(node, ast.Constant) and node.value in KIND_SPELLINGS:
            return True
    return False


def kind_branches(root: str = ROOT) -> List[str]:
    """Every branch on the run's kind in sft_edge and sft_cloud, as ``path:line``."""
    found = []
    for package in ("sft_edge", "sft_cloud"):
        for folder, _, names in os.walk(os.path.join(root, package)):
            for name in sorted(n for n in names if n.endswith(".py")):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path, encoding="utf-8").read())
                resolvers = [
                    n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in RESOLVERS
                ]
                skip = {id(x) for r in resolvers for x in ast.walk(r)}
                for node in ast.walk(tree):
                    tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else []
                    tests += node.ifs if isinstance(node, ast.comprehension) else []
                    found += [
                        f"{os.path.relpath(path, root)}:{t.lineno}"
                        for t in tests
                        if id(node) not in skip and _names_a_kind(t)
                    ]
    return found


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
                    found.append(
                        f"{rel}:{node.lineno} {node.name}: {size} lines (at most {MAX_FUNCTION_LINES})"
                    )
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGES):
                if node.module == module:
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{rel}:{node.lineno} imports the private {node.module}.{alias.name}")
    branches = kind_branches()
    if len(branches) > MAX_KIND_BRANCHES:
        found.append(
            f"{len(branches)} branches on the run's kind (at most {MAX_KIND_BRANCHES}): {', '.join(branches)}"
        )
    if skips > MAX_FMT_SKIPS:
        found.append(f"{skips} '# fmt: skip' markers in the product (at most {MAX_FMT_SKIPS}, for tables)")
    return found


if __name__ == "__main__":
    if sys.argv[1:] == ["--kind-branches"]:  # or another checkout: --kind-branches DIR
        print("\n".join(kind_branches()), f"\n{len(kind_branches())} branches on the run's kind")
        sys.exit(0)
    if sys.argv[1:2] == ["--kind-branches"]:
        print(len(kind_branches(sys.argv[2])), "branches on the run's kind in", sys.argv[2])
        sys.exit(0)
    problems = breaches()
    print("\n".join(problems) or "no breaches")
    sys.exit(1 if problems else 0)
