"""A summarization set nobody writes by hand: Python functions and their docstrings.

For every function with a docstring in a Python source, the article is the function's
source with the docstring taken out (signature and body, dedented) and the summary is the
first sentence of the docstring's first paragraph (split by the same Punkt splitter ROUGE
uses). Functions whose first sentence is not a plain sentence (too short, too long, no
final period, a doctest or a field list) are left out, so the summaries read like prose.
"""
from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
from dataclasses import dataclass
from typing import Iterator, Sequence

from fine_tuning.abstractive_summarization.rouge import split_sentences

__all__ = ["FunctionExample", "stdlib_python_files", "function_examples", "examples_of_files"]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class FunctionExample:
    id: str            # "<file relative to its root>:<qualified name>"
    article: str       # the function without its docstring
    summary: str       # the docstring's first sentence
    file: str          # relative path of the source file


def stdlib_python_files(root: str | None = None) -> list[tuple[str, str]]:
    """(path, path relative to root) of the standard library's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found.append((path, os.path.relpath(path, root)))
    return sorted(found, key=lambda item: item[1])


def _first_sentence(docstring: str) -> str | None:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    if not paragraph or paragraph.startswith((">>>", ":", "@")):
        return None
    sentences = split_sentences(paragraph)
    first = sentences[0] if sentences else ""
    words = len(first.split())
    return first if 3 <= words <= 30 and first.endswith(".") else None


def _without_docstring(source: str, node: ast.AST) -> str | None:
    """The function's source lines minus those of its docstring, dedented."""
    lines = source.splitlines()
    doc = node.body[0]
    start = node.lineno - 1 if not node.decorator_list else node.decorator_list[0].lineno - 1
    kept = lines[start:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    if len(node.body) == 1:                   # only a docstring: nothing to summarize
        return None
    return textwrap.dedent("\n".join(kept)).strip("\n")


def function_examples(source: str, relative_path: str, max_article_chars: int = 4000) -> Iterator[FunctionExample]:
    """The (article, summary) examples of one Python source, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return

    def visit(node: ast.AST, prefix: str) -> Iterator[FunctionExample]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    docstring = ast.get_docstring(child)
                    summary = _first_sentence(docstring) if docstring else None
                    article = _without_docstring(source, child) if summary else None
                    if article and len(article) <= max_article_chars:
                        yield FunctionExample(f"{relative_path}:{name}", article, summary, relative_path)
                yield from visit(child, name + ".")

    yield from visit(tree, "")


def examples_of_files(files: Sequence[tuple[str, str]]) -> Iterator[tuple[str, FunctionExample]]:
    """(file text, example) for every example of readable UTF-8 files."""
    for path, relative in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for example in function_examples(text, relative):
            yield text, example
