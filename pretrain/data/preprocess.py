"""Documents -> tokenized `.bin/.idx`: the engine behind `tools/preprocess_data.py`.

Pipeline: the inputs (JSONL, plain, `.gz` or `.zst`; Parquet; Arrow, see `sources.py`) are read
in chunks (whole lines, or rows of the key columns); worker processes each decode, parse, check
and tokenize whole chunks (one tokenizer thread each, so JSON parsing and the building of id
lists run in parallel too, not under one process's GIL) and send back flat token arrays; the
main process writes them in input order. The output is byte-identical whatever the number of
workers or partitions, and whatever the format the same documents came in.

`partitions` > 1 splits the inputs into that many contiguous ranges (plain JSONL at line
boundaries, Parquet at row groups, Arrow at record batches, compressed JSONL files whole), each
processed by its own process with its own workers into a temporary dataset; the results are
concatenated in order at the end, as megatron's `--partitions` does.

What is left out, and counted in the summary:
- empty documents (the text under a key is "" or only whitespace; the whole record is left out,
  so that the datasets of several keys stay aligned), unless `empty="error"`;
- blank lines of JSONL files;
- with `dedup=True`, records whose normalised text was seen before (`dedup.py`), across files,
  workers and partitions: the first occurrence in input order is kept;
- with `skip_bad_lines`, malformed records: a line that is not valid UTF-8 or JSON, not an
  object, missing a key, a non-string or null value, text that is not valid Unicode. Without it
  (the default) the first one stops the run with `path:line: reason` (`path: row N: reason` for
  columnar files, rows counted from 0).
An input with no document left is an error. Outputs are written under temporary names and
renamed at the end, so a failed run leaves nothing under the output names.

Memory: a chunk of ordinary documents is at most 8 MB; one document longer than 1 MiB is
tokenized a piece at a time (`long_documents.py`), and a JSONL line or row over 16 MiB is parsed
in the main process, so that it is never copied to a worker. Such a document costs about twice
its size while it is parsed (the line's bytes, then its text), then its text plus 2 or 4 bytes
per token; see README ("Data") for the bound.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

from pretrain.data.chunk_encoder import ChunkEncoder
from pretrain.data.encode_pipeline import tokenize_into
from pretrain.data.partitions import run_partitions
from pretrain.data.run_stats import SKIP_KINDS, NoDocumentsError, Progress, Stats, skip_summary
from pretrain.data.sources import PreprocessError, Source, Unit, check_columns, expand_inputs
from pretrain.data.tokenizer import Tokenizer

__all__ = [
    "SKIP_KINDS",
    "NoDocumentsError",
    "PreprocessError",
    "Progress",
    "Stats",
    "check_output_directory",
    "expand_inputs",
    "output_prefixes",
    "preprocess",
    "skip_summary",
]

_MIN_CHUNK, _MAX_CHUNK = 64 << 10, 8 << 20


def check_output_directory(output_prefix: str) -> str:
    """The directory of `output_prefix`, created if missing; raises PreprocessError unless a file
    can be created in it. Checked before tokenizing, so a read-only or full destination fails
    at once instead of after hours of work (or as a traceback from the writer)."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    what = f"--output-prefix {output_prefix}: cannot write in the directory {directory}"
    try:
        os.makedirs(directory, exist_ok=True)
        # A real file, not os.access(): root passes os.access on read-only mounts, and a full
        # disk or a quota only shows when something is written.
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        raise PreprocessError(
            f"{what} ({exc.strerror or exc}); choose a writable location, or fix the directory's permissions"
        ) from None
    return directory


def output_prefixes(output_prefix: str, keys: Sequence[str]) -> list[str]:
    """One dataset per JSON key, named as megatron names them."""
    return [f"{output_prefix}_{key}_document" for key in keys]


def _check_arguments(keys: Sequence[str], workers: int, partitions: int) -> None:
    if workers < 1 or partitions < 1:
        raise PreprocessError("workers and partitions must be at least 1")
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"json keys must be distinct and at least one, got {list(keys)}")


def _default_chunk_bytes(sources: Sequence[Source], workers: int) -> int:
    """Enough chunks per worker that the last ones finish together."""
    total = sum(os.path.getsize(s.path) for s in sources)
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, total // max(1, workers * 64))))


def _output_directory(output_prefix: str) -> str:
    """The directory of `output_prefix`; it must exist already, and is checked writable before any work."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise PreprocessError(f"output directory {directory!r} does not exist")
    check_output_directory(output_prefix)
    return directory


def preprocess(
    inputs: Sequence[str],
    *,
    output_prefix: str,
    tokenizer: Tokenizer,
    keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    skip_bad_lines: bool = False,
    empty: str = "skip",
    dedup: bool = False,
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
) -> Stats:
    """Tokenize `inputs` (files, globs, directories; JSONL, Parquet or Arrow) into
    `{output_prefix}_{key}_document.bin/.idx`."""
    _check_arguments(keys, workers, partitions)
    sources = expand_inputs(inputs)
    for source in sources:
        if source.columnar:
            check_columns(source, keys)
    if chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(sources, workers)
    encoder = ChunkEncoder(
        tokenizer, keys=keys, append_eod=append_eod, skip_bad_lines=skip_bad_lines, empty=empty, dedup=dedup
    )
    prefixes = output_prefixes(output_prefix, keys)
    directory = _output_directory(output_prefix)
    update = progress.update if progress is not None else None

    partitions = min(partitions, workers)  # every partition needs a worker
    if partitions == 1:
        units = [Unit(i, s.path, kind=s.kind) for i, s in enumerate(sources)]
        return tokenize_into(
            prefixes, units, sources, encoder, workers=workers, chunk_bytes=chunk_bytes, on_progress=update
        )
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(output_prefix)}.partitions.", dir=directory)
    try:
        return run_partitions(
            sources,
            prefixes,
            encoder,
            scratch,
            workers=workers,
            partitions=partitions,
            chunk_bytes=chunk_bytes,
            update=update,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
