"""A knowledge base of Markdown articles, searched with Okapi BM25 (written here: a few
dozen lines, no dependency).

An article is one ``*.md`` file; its title is its first ``# `` heading (else the file
name), its id the file name without ``.md``. Scores use the usual BM25 parameters
(``k1 = 1.5``, ``b = 0.75``) and the non-negative IDF ``log(1 + (N - n + 0.5) / (n + 0.5))``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Article", "Hit", "KnowledgeBase", "tokens"]

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by can do does for from how i if in is it my me of on or our so "
    "that the their there this to was we what when where which who why will with you your".split()
)


def tokens(text: str) -> list[str]:
    """Lower-case words without stop words, with a light suffix strip (arrived, arrives,
    arrival and arrive all become ``arriv``)."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOP:
            continue
        for suffix in ("ing", "al", "ed", "es", "s", "e"):
            if len(word) > len(suffix) + 3 and word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        out.append(word)
    return out


@dataclass(frozen=True, slots=True)
class Article:
    id: str
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the article, its BM25 score and its first paragraph."""

    id: str
    title: str
    score: float
    excerpt: str


class KnowledgeBase:
    def __init__(self, articles: list[Article], *, k1: float = 1.5, b: float = 0.75) -> None:
        self.articles = articles
        self.k1, self.b = k1, b
        # the title counts twice: it says what the article is about
        self._tf = [Counter(tokens(f"{a.title}\n{a.title}\n{a.text}")) for a in articles]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = (sum(self._len) / len(self._len)) if self._len else 0.0
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(articles)
        self._idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    @classmethod
    def from_folder(cls, folder: str | Path) -> KnowledgeBase:
        articles = []
        for path in sorted(Path(folder).glob("*.md")):
            text = path.read_text(encoding="utf-8")
            title = next(
                (line[2:].strip() for line in text.splitlines() if line.startswith("# ")),
                path.stem,
            )
            articles.append(Article(path.stem, title, text))
        return cls(articles)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` best articles with a positive score, best first."""
        terms = [t for t in dict.fromkeys(tokens(query)) if t in self._idf]
        scored = []
        for i, tf in enumerate(self._tf):
            norm = self.k1 * (1 - self.b + self.b * self._len[i] / (self._avg or 1.0))
            s = sum(self._idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf)
            if s > 0:
                scored.append((s, i))
        scored.sort(key=lambda p: (-p[0], p[1]))
        return [
            Hit(
                self.articles[i].id,
                self.articles[i].title,
                round(s, 4),
                _excerpt(self.articles[i].text),
            )
            for s, i in scored[:k]
        ]


def _excerpt(text: str) -> str:
    for block in text.split("\n\n"):
        block = block.strip()
        if block and not block.startswith("#"):
            return block[:400]
    return ""
