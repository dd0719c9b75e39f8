"""Offline text blocklist that survives the usual evasions.

A prompt is normalised before matching, the same way as every blocklist term:

1. Unicode: NFKC (fullwidth, circled, mathematical letters -> ASCII), confusable letters from
   other scripts (Cyrillic ``а``, Greek ``ο`` ...) mapped to the Latin letter they imitate,
   accents and other combining marks dropped, invisible format characters (zero-width space,
   soft hyphen) removed, case folded.
2. Leetspeak inside words: ``0 3 4 5 7 8 9 @ $ + €`` -> ``o e a s t b g a s t e``; ``1 ! |`` stand
   for ``i`` or ``l`` (both readings are tried). Tokens made only of digits are left alone.
3. Words are split at punctuation (``k.i.l.l`` -> ``k i l l``); a run of one- or two-letter
   pieces is joined again (``n u d e``, ``nu de``), and so is each whitespace-separated token
   (``self-harm`` -> ``selfharm``).
4. Repeated letters match a single one (``nuuude``), but never shorten a term (``as`` is not
   ``ass``); a match may carry an inflection (-s, -es, -ed, -d, -ing, -er, -ers, -y).

Matching is on whole words, so ``skill`` or ``Essex`` never match ``kill`` or ``sex``. Allowlisted
phrases (``color bleeding``) exempt the words they cover. The lists shipped in ``data/`` are a
baseline; users add terms with ``--blocklist FILE`` and exemptions with ``--allowlist FILE``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from transfer.errors import TransferError

DATA = Path(__file__).resolve().parent / "data"

#: Letters from other scripts that look like Latin letters (lowercase, after case folding).
CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "ь": "b", "п": "n", "г": "r", "һ": "h", "ӏ": "l", "ү": "y", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "μ": "u", "ς": "c",
    # Armenian and Latin look-alikes without a decomposition
    "օ": "o", "ս": "u", "հ": "h", "ı": "i", "ℓ": "l", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t",
    "æ": "ae", "œ": "oe",
}
LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s", "+": "t", "€": "e"}
AMBIGUOUS = "1!|"  # i or l
SUFFIXES = ("", "s", "es", "ed", "d", "ing", "er", "ers", "y")
SHORT = 2  # pieces this long or shorter may be a word split up to evade the list
MAX_JOIN = 24


def _fold(text: str) -> str:
    """Steps 1 of the module docstring: one lowercase ASCII-leaning string, same length semantics."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(CONFUSABLES.get(c, c) for c in text)
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Me", "Cf"))


def _collapse(s: str) -> str:
    return re.sub(r"(.)\1+", r"\1", s)


def _mapped(text: str, ambiguous_as: str) -> list[str]:
    """Whitespace tokens after folding and leet mapping, outer punctuation stripped."""
    out = []
    for raw in _fold(text).split():
        raw = re.sub(r"[^0-9a-z*#]+$", "", raw)  # trailing punctuation ("nude!!") is not leet
        raw = re.sub(r"^[^0-9a-z@$]+", "", raw)
        if raw and not raw.isdigit():
            raw = "".join(ambiguous_as if c in AMBIGUOUS else LEET.get(c, c) for c in raw)
        if raw:
            out.append(raw)
    return out


def _tokens(text: str, ambiguous_as: str) -> list[list[str]]:
    """Whitespace tokens, each as its alphanumeric pieces after leet mapping."""
    return [p for p in (re.findall(r"[0-9a-z]+", raw) for raw in _mapped(text, ambiguous_as)) if p]


def _mask_pattern(token: str) -> re.Pattern | None:
    """``f*ck`` / ``sh#t``: each ``*`` or ``#`` stands for one letter, when at least two letters are
    shown and no more are hidden than shown."""
    core = re.sub(r"[^a-z*#]", "", token)
    hidden, shown = sum(c in "*#" for c in core), sum(c.isalpha() for c in core)
    if not hidden or shown < 2 or hidden > shown:
        return None
    return re.compile("".join("[a-z]" if c in "*#" else c for c in core))


@dataclass(frozen=True)
class Term:
    text: str
    words: int
    joined: str  # letters, before collapsing repeats


def read_terms(path: Path) -> list[str]:
    """One term per line; ``#`` starts a comment; blank lines ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TransferError(f"cannot read word list {path}: {e}") from None
    return [t for t in (line.split("#", 1)[0].strip() for line in lines) if t]


class BlocklistGuard:
    """Text guard: blocks a prompt containing a blocklist term, however it is spelled."""

    name = "blocklist"

    def __init__(self, extra_blocklists=(), extra_allowlists=(), use_shipped: bool = True):
        terms = (read_terms(DATA / "blocklist.txt") if use_shipped else []) + [t for p in extra_blocklists for t in read_terms(p)]
        allow = (read_terms(DATA / "allowlist.txt") if use_shipped else []) + [t for p in extra_allowlists for t in read_terms(p)]
        self.index: dict[str, list[Term]] = {}
        for term in terms:
            words = [w for pieces in _tokens(term, "i") for w in pieces]
            if not words:
                continue
            joined = "".join(words)
            self.index.setdefault(_collapse(joined), []).append(Term(term, len(words), joined))
        self.allow = [[w for pieces in _tokens(a, "i") for w in pieces] for a in allow]
        self.allow = [a for a in self.allow if a]
        self.max_words = max((t.words for ts in self.index.values() for t in ts), default=1)

    def find(self, text: str) -> str | None:
        """The blocklist term ``text`` contains, or None."""
        for ambiguous_as in "il":
            hit = self._find(_tokens(text, ambiguous_as)) or self._find_masked(_mapped(text, ambiguous_as))
            if hit:
                return hit
        return None

    def check_text_safety(self, prompt: str) -> bool:
        return self.find(prompt) is None

    def text_verdict(self, prompt: str) -> tuple[bool, str]:
        """(safe, why)."""
        hit = self.find(prompt)
        return hit is None, f"matches blocklist term {hit!r}" if hit else ""

    # -- matching -------------------------------------------------------------------------------
    def _lookup(self, s: str, n: int, all_short: bool) -> str | None:
        for suffix in SUFFIXES:
            if suffix and not s.endswith(suffix):
                continue
            base = s[: len(s) - len(suffix)] if suffix else s
            for term in self.index.get(_collapse(base), ()):
                if len(base) >= len(term.joined) and (n == 1 or n == term.words or all_short):
                    return term.text
        return None

    def _find(self, tokens: list[list[str]]) -> str | None:
        pieces = [p for tok in tokens for p in tok]
        masked = self._allowed_positions(pieces)
        # each whitespace token joined (self-harm, nak.ed), unless an allowlisted phrase covers it
        pos = 0
        for tok in tokens:
            if len(tok) > 1 and not masked.intersection(range(pos, pos + len(tok))):
                hit = self._lookup("".join(tok), 1, False)
                if hit:
                    return hit
            pos += len(tok)
        # windows of pieces: single words, multi-word terms, and runs of short pieces (n u d e)
        for i in range(len(pieces)):
            s = ""
            all_short = True
            for n in range(1, min(MAX_JOIN, len(pieces) - i) + 1):
                if i + n - 1 in masked:
                    break
                piece = pieces[i + n - 1]
                s += piece
                all_short = all_short and len(piece) <= SHORT
                if n > self.max_words and not all_short:
                    break
                hit = self._lookup(s, n, all_short and n > 1)
                if hit:
                    return hit
        return None

    def _find_masked(self, tokens: list[str]) -> str | None:
        for token in tokens:
            pattern = _mask_pattern(token)
            if pattern is None:
                continue
            for term in (t for ts in self.index.values() for t in ts):
                if any(pattern.fullmatch(term.joined + suffix) for suffix in SUFFIXES):
                    return term.text
        return None

    def _allowed_positions(self, pieces: list[str]) -> set[int]:
        masked: set[int] = set()
        for phrase in self.allow:
            n = len(phrase)
            for i in range(len(pieces) - n + 1):
                if pieces[i : i + n] == phrase:
                    masked.update(range(i, i + n))
        return masked
