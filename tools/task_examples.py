"""Writes the data of the README's fine-tuning examples, offline and deterministic.

  python tools/task_examples.py OUT_DIR

OUT_DIR/stdlib_functions.jsonl: {"code": the first lines of a function, "package": the standard
library package it comes from} for functions of a few packages of this interpreter's stdlib.
OUT_DIR/reverse.jsonl: {"input": a word of letters, "target": the word reversed}.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("asyncio", "email", "http", "xml")
MAX_CHARS = 240  # the snippet: a function's first lines, cut to at most this many characters


def package_functions(package: str) -> list[str]:
    """Source of every function defined in a stdlib package, cut to MAX_CHARS."""
    snippets = []
    for path in sorted((Path(sysconfig.get_paths()["stdlib"]) / package).rglob("*.py")):
        if "test" in path.parts:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_source_segment(source, node) or ""
                snippets.append(text[:MAX_CHARS])
    return [s for s in snippets if s]


def reverse_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = {"".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))) for _ in range(count)}
    return [{"input": w, "target": w[::-1]} for w in sorted(words)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"code": code, "package": name} for name in PACKAGES for code in package_functions(name)]
    write_jsonl(out / "stdlib_functions.jsonl", rows)
    write_jsonl(out / "reverse.jsonl", reverse_rows(4000))
    print(f"wrote {len(rows)} functions of {', '.join(PACKAGES)} and reverse.jsonl to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples_data"))
