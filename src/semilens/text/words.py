"""How well a page's text reads as English words: glued words and a reading score.

Some PDF producers draw no space glyphs and place each word (or each glyph) at its own
position; a reader that does not turn the gaps back into spaces glues words together
("usesa radio-frequency-poweredelectromagneticfield"). Two measures catch that without a
reference text, using the offline English word list of ``wordfreq`` (its data ships in the
wheel, so nothing is downloaded at run time):

- ``glued_words``: words of ``LONG`` or more letters that are not words themselves but
  split into two or more common words. English has few words that long, and technical
  compounds ("photolithography") are in the list, so such a word is almost always two
  words run together.
- ``reading_score``: the letter-weighted share of words found in the list. Glued words
  are long and unknown, so they weigh heavily; text split too finely ("w o r d") is
  single letters, which count as unknown too.

Both are used by extract_pdfs to choose, per page, between readings of the text layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Words this long are rare enough in English that an unknown one is worth splitting.
LONG = 16
# A part of a split must be at least this common (Zipf scale: 3 = once per million words):
# rare list entries (names, typos, fragments) would split almost any string.
PART_ZIPF = 3.0
# Single letters that are words; any other lone letter is a sign of over-splitting.
_ONE_LETTER = {"a", "i"}
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class WordCheck:
    """Counts behind the rates, so callers can pool pages into a file figure."""

    words: int  # letter runs in the text
    long: int  # of which LONG or more letters
    glued: int  # of which split into two or more common words
    letters: int  # letters in all words
    known_letters: int  # letters in words found in the list

    @property
    def glued_rate(self) -> float:
        """Glued words per word of text (0 for an empty text)."""
        return self.glued / self.words if self.words else 0.0

    @property
    def score(self) -> float:
        """Letter-weighted share of known words, 0..1 (0 for an empty text)."""
        return self.known_letters / self.letters if self.letters else 0.0

    def __add__(self, other: WordCheck) -> WordCheck:
        return WordCheck(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self) -> tuple[int, ...]:
        return (self.words, self.long, self.glued, self.letters, self.known_letters)


EMPTY = WordCheck(0, 0, 0, 0, 0)


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, float]:
    from wordfreq import get_frequency_dict

    return get_frequency_dict("en")


@lru_cache(maxsize=1)
def _min_part_freq() -> float:
    return 10 ** (PART_ZIPF - 9)  # Zipf = log10(frequency per billion words)


def is_word(token: str) -> bool:
    low = token.lower()
    if len(low) == 1:
        return low in _ONE_LETTER
    return low in _lexicon()


@lru_cache(maxsize=65536)
def split_glued(token: str) -> tuple[str, ...] | None:
    """The split of ``token`` into the fewest common words (two or more), or None.

    A word the list knows is not split. Case is ignored, so "ReactiveIonEtcher" counts
    as glued; code identifiers written in camel case count too, and are rare in prose.
    """
    low = token.lower()
    lex = _lexicon()
    if low in lex:
        return None
    floor = _min_part_freq()
    n = len(low)
    # best[i]: fewest parts covering low[:i] (None: not coverable), with a back pointer
    best: list[tuple[int, int] | None] = [None] * (n + 1)
    best[0] = (0, 0)
    for i in range(1, n + 1):
        for j in range(max(0, i - 30), i):
            if best[j] is None:
                continue
            part = low[j:i]
            ok = part in _ONE_LETTER if len(part) == 1 else lex.get(part, 0.0) >= floor
            if ok and (best[i] is None or best[j][0] + 1 < best[i][0]):
                best[i] = (best[j][0] + 1, j)
    if best[n] is None or best[n][0] < 2:
        return None
    parts, i = [], n
    while i > 0:
        j = best[i][1]
        parts.append(low[j:i])
        i = j
    return tuple(reversed(parts))


def check(text: str) -> WordCheck:
    """Word counts of ``text``: see ``WordCheck``."""
    words = long = glued = letters = known = 0
    for m in _WORD.finditer(text):
        tok = m.group()
        words += 1
        letters += len(tok)
        if is_word(tok):
            known += len(tok)
        if len(tok) >= LONG:
            long += 1
            if split_glued(tok) is not None:
                glued += 1
    return WordCheck(words, long, glued, letters, known)


def glued_words(text: str) -> list[str]:
    """The words of ``text`` that are two or more words run together (in order, repeated)."""
    return [m.group() for m in _WORD.finditer(text) if len(m.group()) >= LONG and split_glued(m.group())]


def glued_rate(text: str) -> float:
    """Share of the words of ``text`` that are glued (see ``glued_words``)."""
    return check(text).glued_rate


def reading_score(text: str) -> float:
    """Letter-weighted share of dictionary words in ``text`` (see ``WordCheck.score``)."""
    return check(text).score
