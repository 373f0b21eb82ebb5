"""Training corpora: reading text documents and the fixed train / held-out split.

A corpus is either

- a folder: every file under it whose name matches ``glob`` (default ``*.py``),
  skipping directories named in ``exclude_dirs``; a document's id is its path
  relative to the folder with ``/`` separators, so the split does not depend on
  where (or on which OS) the folder lives;
- a ``.jsonl`` file: one JSON object per line with a ``"text"`` field; its id is
  the object's ``"id"`` (or ``"path"``) field when present, else ``"line-N"``.

Text is read as exact UTF-8 bytes (no newline translation): tokenizers and
bits-per-byte figures see the files as they are. Files that are not valid UTF-8
are skipped and counted.

Split: a document is held out for evaluation iff
``int(sha256(id).hexdigest(), 16) % 20 == 0`` (about 5%). The rule depends on the
id alone, so adding or removing other files never moves a document across the
split, and every tool (tokenizer, target training, distillation, evaluation)
agrees on it.

The built-in models use the Python 3.11 standard library (PSF licence):
``sysconfig.get_paths()["stdlib"]`` minus ``STDLIB_EXCLUDE_DIRS``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

HOLDOUT_MODULUS = 20  # 1 in 20 documents (~5%) is held out

# Why each directory is left out of the built-in corpus:
#   test, tests         the regression suites: 4x the size of the library and full of deliberately odd code
#   site-packages       third-party packages installed into this interpreter, not the PSF standard library
#   __pycache__         bytecode caches (no .py files, listed for folders read with other globs)
#   idlelib, turtledemo GUI application and demo scripts rather than library code
#   lib2to3             a deprecated Python 2 converter whose fixers are mostly Python 2 syntax patterns
#   encodings           machine-generated codec tables (256-entry string literals), ~1/3 of the bytes
#   pydoc_data          one 750 kB generated string literal (the help topics)
STDLIB_EXCLUDE_DIRS: tuple[str, ...] = (
    "test", "tests", "site-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3", "encodings", "pydoc_data",
)
DEFAULT_GLOB = "*.py"


@dataclasses.dataclass(frozen=True)
class Document:
    id: str  # relative path (folders) or JSONL id; decides the split
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclasses.dataclass
class Corpus:
    """Documents sorted by id, with what reading skipped."""

    source: str
    documents: list[Document]
    skipped_non_utf8: list[str] = dataclasses.field(default_factory=list)

    def split(self) -> tuple[list[Document], list[Document]]:
        """(train, held-out), each in id order."""
        train = [d for d in self.documents if not is_heldout(d.id)]
        held = [d for d in self.documents if is_heldout(d.id)]
        return train, held

    @property
    def num_bytes(self) -> int:
        return sum(d.num_bytes for d in self.documents)

    def describe(self) -> dict:
        train, held = self.split()
        return {
            "source": self.source,
            "documents": len(self.documents),
            "bytes": self.num_bytes,
            "train_documents": len(train),
            "train_bytes": sum(d.num_bytes for d in train),
            "heldout_documents": len(held),
            "heldout_bytes": sum(d.num_bytes for d in held),
            "skipped_non_utf8": len(self.skipped_non_utf8),
            "split_rule": f"held out iff int(sha256(id).hexdigest(), 16) % {HOLDOUT_MODULUS} == 0",
        }


def is_heldout(doc_id: str) -> bool:
    """The fixed evaluation split: about 1 in ``HOLDOUT_MODULUS`` documents, by hash of the id."""
    return int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest(), 16) % HOLDOUT_MODULUS == 0


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_folder(
    root: str | os.PathLike, glob: str = DEFAULT_GLOB, exclude_dirs: Sequence[str] = STDLIB_EXCLUDE_DIRS
) -> Corpus:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {root}")
    excluded = set(exclude_dirs)
    docs, skipped = [], []
    # os.walk with pruning: never descends into excluded trees (test/ alone holds ~20k files).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for name in sorted(filenames):
            if not fnmatch.fnmatch(name, glob):
                continue
            path = Path(dirpath) / name
            if not path.is_file():  # dangling symlinks
                continue
            rel = path.relative_to(root).as_posix()
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            docs.append(Document(rel, text))
    docs.sort(key=lambda d: d.id)
    return Corpus(str(root), docs, skipped)


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object is an error naming its number."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected an object")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike, text_field: str = "text") -> Corpus:
    path = Path(path)
    docs: list[Document] = []
    seen: set[str] = set()
    for lineno, obj in json_lines(path):
        if not isinstance(obj.get(text_field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r} field")
        doc_id = str(obj.get("id", obj.get("path", f"line-{lineno}")))
        if doc_id in seen:
            raise ValueError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
        docs.append(Document(doc_id, obj[text_field]))
    docs.sort(key=lambda d: d.id)
    return Corpus(str(path), docs)


def read_corpus(
    path: str | os.PathLike | None = None,
    glob: str = DEFAULT_GLOB,
    exclude_dirs: Sequence[str] = STDLIB_EXCLUDE_DIRS,
) -> Corpus:
    """A folder or a ``.jsonl`` file; ``None`` or ``"stdlib"`` is this interpreter's standard library."""
    if path is None or str(path) == "stdlib":
        return read_folder(stdlib_dir(), glob, exclude_dirs)
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        return read_jsonl(p)
    if p.is_dir():
        return read_folder(p, glob, exclude_dirs)
    raise FileNotFoundError(f"corpus {p} is neither a folder nor a .jsonl file")


def corpus_fingerprint(documents: Iterable[Document]) -> str:
    """A hash of ids and texts: tokenized-data caches and checkpoints check they still match."""
    h = hashlib.sha256()
    for d in documents:
        for part in (d.id, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:16]


def add_corpus_args(parser) -> None:
    """The ``--corpus/--glob/--exclude-dir`` options every training tool shares."""
    parser.add_argument("--corpus", default="stdlib",
                        help="folder of text files or .jsonl with a 'text' field (default: this Python's stdlib)")
    parser.add_argument("--glob", default=DEFAULT_GLOB, help="file name pattern inside a corpus folder (default *.py)")
    parser.add_argument("--exclude-dir", action="append", default=None,
                        help="directory name to skip inside a corpus folder (repeatable; default: "
                        + ", ".join(STDLIB_EXCLUDE_DIRS) + ")")


def corpus_from_args(args) -> Corpus:
    exclude = STDLIB_EXCLUDE_DIRS if args.exclude_dir is None else tuple(args.exclude_dir)
    corpus = read_corpus(args.corpus, args.glob, exclude)
    if not corpus.documents:
        raise ValueError(f"corpus {corpus.source} has no documents matching {args.glob!r}")
    return corpus
