"""Write the Python standard library's own source files as a JSONL corpus.

This is the embedded default corpus: every machine that runs Python has it, so the quickstart
needs no download. One line per `.py` file: {"text": <source>, "path": <path under stdlib>}.

    python tools/make_stdlib_corpus.py --output corpus.jsonl [--max-bytes N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

# Third-party packages installed into the interpreter are not "the standard library", and would
# make the corpus differ from machine to machine.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def iter_stdlib_sources(root: str) -> Iterator[tuple[str, str]]:
    """Yield (relative path, text) for each UTF-8 `.py` file under `root`.

    Files come in the order of a hash of their relative path: deterministic (the corpus is
    byte-identical across runs and machines with the same Python version) but mixed across
    packages, so a contiguous train/valid split by document, or a --max-bytes prefix, is a fair
    sample of the whole library rather than its alphabetically last packages. Files that are
    not valid UTF-8 (a few deliberately broken test inputs) are skipped: the corpus is JSON text;
    so are empty ones (many `__init__.py`), which preprocessing would reject as empty documents.
    """
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.isfile(path):  # isfile: skip dangling symlinks
                paths.append(os.path.relpath(path, root))
    for rel in sorted(paths, key=lambda rel: hashlib.sha1(rel.encode()).hexdigest()):
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.isspace() or not text:  # empty __init__.py files carry nothing to learn
            continue
        yield rel, text


def write_corpus(output: str, *, root: str, max_bytes: int | None = None) -> tuple[int, int]:
    """Write the corpus to `output` atomically; return (documents, bytes of text written).

    With `max_bytes`, stop before the first file that would take the total UTF-8 text size
    past it (useful for quick tests).
    """
    tmp = f"{output}.tmp-{os.getpid()}"
    docs = 0
    total = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for rel, text in iter_stdlib_sources(root):
                size = len(text.encode("utf-8"))
                if max_bytes is not None and total + size > max_bytes:
                    break
                out.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False))
                out.write("\n")
                docs += 1
                total += size
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return docs, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop before the text exceeds N bytes")
    parser.add_argument(
        "--root",
        default=sysconfig.get_paths()["stdlib"],
        help="directory to collect .py files from (default: this interpreter's standard library)",
    )
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes <= 0:
        parser.error("--max-bytes must be positive")
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root!r} is not a directory")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"the directory of --output does not exist: {out_dir}")

    docs, total = write_corpus(args.output, root=args.root, max_bytes=args.max_bytes)
    print(f"wrote {docs} documents, {total / 1e6:.1f} MB of text to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
