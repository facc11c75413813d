"""Two groups of text built from the local Python installation: its code and its English prose.

The `python` setting of examples/settings.py trains on text that is not in p2pfed/corpus and needs no download:
the standard library's top-level modules (`sysconfig.get_paths()["stdlib"]`, `*.py`, in name order) split into

- `code`: each module's source with its docstrings and comments removed (`ast.unparse`, so one canonical layout);
- `prose`: the same modules' docstrings (`ast.get_docstring`, cleaned) and comments of at least three words.

Modules are taken in name order until both groups hold `chars` characters (the rest is cut). The text is the same
on every run with the same Python version (it is read, not sampled); another version gives other text.
"""

from __future__ import annotations

import ast
import io
import sysconfig
import tokenize
from pathlib import Path

GROUPS = ("code", "prose")
CHARS = 64_000  # per group: 8 peers of 88 blocks of 128 bytes need 45,056 bytes a group


def write_python_text(folder: Path, chars: int = CHARS) -> Path:
    """`folder`/code.txt and `folder`/prose.txt (written once; an existing pair is kept)."""
    files = [folder / f"{group}.txt" for group in GROUPS]
    if all(f.is_file() for f in files):
        return folder
    code, prose = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if min(_length(code), _length(prose)) >= chars:
            break
        split = _split_module(path)
        if split is not None:
            code.append(split[0])
            prose.append(split[1])
    folder.mkdir(parents=True, exist_ok=True)
    for file, parts in zip(files, (code, prose)):
        file.write_text("\n\n".join(parts)[:chars] + "\n", encoding="utf-8")
    return folder


def _split_module(path: Path) -> tuple[str, str] | None:
    """(code without docstrings and comments, docstrings and comments), or None for a module that does not
    read or parse (encodings, syntax of another version)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        comments = [t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    except (UnicodeDecodeError, SyntaxError, tokenize.TokenError, ValueError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc)
                node.body = node.body[1:] or [ast.Pass()]
    prose = "\n\n".join([*docs, "\n".join(c for c in comments if len(c.split()) >= 3)])
    return ast.unparse(tree), prose


def _length(parts: list[str]) -> int:
    return sum(len(p) + 2 for p in parts)
