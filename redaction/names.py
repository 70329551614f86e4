"""The cheap names tier: person names from gazetteers, capitalisation and cue words.

The compiled gate reports capitalised words and cue phrases ("my name is", "Dear", "Mr");
this module turns those hits into PERSON spans with a handful of rules:

- first name + capitalised word ("Priya Raghunathan", "Alice Smith") -> PERSON, extended
  over further capitalised words and particles ("Ludwig van Beethoven");
- a first name that is also an English word ("Grace", "Will") needs a known surname after
  it, or a cue before it;
- a lone first name that is not an English word ("Priya", "Łukasz") -> PERSON;
- after a cue ("my name is", "I'm", "Dear", "regards,", "Mr") the next one to three words
  are a name when they are gazetteer names or capitalised non-words, in any case
  ("my name is ana lópez").
"""

from __future__ import annotations

import copy
import re

from redaction import native as native_mod
from redaction.gazetteer import PARTICLES, STOP_WORDS, Gazetteer
from redaction.types import Entity

PERSON = "PERSON"
_LETTERS = r"[^\W\d_]"
TOKEN = re.compile(rf"{_LETTERS}+(?:['’\-]{_LETTERS}+)*")
_GAP = re.compile(r"[ \t]+")
_POSSESSIVE = ("'s", "’s")
STOP_WORDS_SET = frozenset(STOP_WORDS)
_PARTICLE_BEFORE = re.compile(r"(?<![^\W\d_])(?:" + "|".join(sorted(PARTICLES)) + r")[ \t]+$")

TITLES = frozenset("mr mrs ms miss mx dr prof sir madam mme mlle herr frau sr sra srta dott ing".split())
# Words that often come right before a person's name ("Ask Akise Tevetoğlu").
WEAK_CUES = ("to", "from", "with", "by", "for", "ask", "asked", "tell", "told", "and", "met", "meet", "ping",
             "emailed", "invite", "invited", "per", "via", "holder", "owner", "assignee", "reviewer", "author")

# Cue phrases the gate looks for (case-insensitive); the name follows.
# After these the name may be written in lowercase ("my name is ana lópez", "thanks john").
LOWERCASE_CUES = (
    "my name is", "name is", "i am", "i'm", "im", "it's", "its", "this is", "call me", "dear", "hi", "hello", "hey", "thanks",
    "thank you", "regards", "kind regards", "cheers", "sincerely", "signed", "full name", "first name",
    "last name", "surname", "my wife", "my husband", "my son", "my daughter", "my colleague", "my manager",
    "my friend", "my boss", "my partner", "my mother", "my father", "my brother", "my sister",
)
# After these only a capitalised word is taken ("Customer: Mücevher Şama", "Best,\nAnna").
CAPITAL_CUES = (
    "names are", "best", "name", "patient", "customer", "client", "contact", "attn", "cc",
    "employee", "applicant", "candidate", "tenant", "named", "called", "colleague",
)
STRONG_CUES = LOWERCASE_CUES + CAPITAL_CUES


# Cues after which a lone capitalised word that is not an English word is taken for a name.
NAME_CUES = frozenset((
    "my name is", "name is", "i'm", "im", "i am", "it's", "its", "this is", "call me", "dear", "hi", "hello", "hey", "thanks", "thank you",
    "regards", "kind regards", "best", "cheers", "sincerely", "signed", "name", "full name", "first name",
    "last name", "surname", "patient", "customer", "client", "attn", "employee", "applicant", "candidate", "tenant",
    "my wife", "my husband", "my son", "my daughter", "my colleague", "my manager", "my friend", "my boss",
    "my partner", "my mother", "my father", "my brother", "my sister",
))


# After a sign-off one capitalised word is the writer's name, even one that is also a
# place ("thanks, Sasaki").
SIGN_OFFS = frozenset(("thanks", "thank you", "regards", "kind regards", "best", "cheers", "sincerely", "signed"))


# Cues that say outright that a name follows: any lowercase words that are not English
# words are taken ("my name is chidi okonkwo").
IDENTIFYING_CUES = frozenset(("my name is", "name is", "call me", "full name", "first name", "last name", "surname"))


class NameFinder:
    def __init__(self, gazetteer: Gazetteer, strict: bool = False, native: bool = False):
        """native: the token walk (_follow) in redaction/_native.c (same tokens)."""
        self.first = gazetteer.first
        self.surnames = gazetteer.surnames
        self.common = gazetteer.common
        self.names = gazetteer.first | gazetteer.surnames
        self.places = gazetteer.places
        # given names: not English words, or English words that are names in English too
        self.given = frozenset(n for n in gazetteer.first if n not in gazetteer.common or n in gazetteer.anglo_first)
        self.strict = strict
        if native:
            self._walk_natively()

    def natively(self) -> NameFinder:
        """A finder sharing this one's gazetteers, with the token walk in C."""
        twin = copy.copy(self)
        twin._walk_natively()
        return twin

    def _walk_natively(self) -> None:
        follow_tokens = native_mod.extension.follow_tokens
        sets = (self.common, self.surnames, self.given, self.names, PARTICLES, STOP_WORDS_SET)

        def follow(text: str, pos: int, max_tokens: int, any_case: bool, any_first: bool = False,
                   surname_at: int = -1, unknown_ok: bool = False) -> list[tuple[int, int]]:
            return follow_tokens(text, pos, max_tokens, any_case, any_first, surname_at, unknown_ok, sets)

        self._follow = follow

    # -- helpers ---------------------------------------------------------------------------

    def _token_at(self, text: str, start: int) -> tuple[int, int] | None:
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_@./\\"):
            return None  # inside a word, an email, a path or an identifier
        m = TOKEN.match(text, start)
        if not m:
            return None
        end = m.end()
        if end < len(text) and (text[end].isdigit() or text[end] in "_@"):
            return None  # identifier-like: Foo_bar, User1, name@
        word = m.group()
        if word.endswith(_POSSESSIVE):
            end -= 2
        return start, end

    def _prev_word(self, text: str, start: int) -> str:
        i = start - 1
        while i >= 0 and text[i] in " \t":
            i -= 1
        if i >= 0 and text[i] == ".":
            i -= 1
        j = i
        while j >= 0 and text[j].isalpha():
            j -= 1
        return text[j + 1:i + 1].lower()

    def _follow(self, text: str, pos: int, max_tokens: int, any_case: bool,
                any_first: bool = False, surname_at: int = -1, unknown_ok: bool = False) -> list[tuple[int, int]]:
        """Name tokens starting at pos (after a cue or a first name): capitalised words that
        are names or not English words, lowercase gazetteer names when any_case, particles
        ("van der", "de la") when a capitalised word follows them. any_first: the first
        word only needs a capital (the caller judges it). surname_at: the index of the token
        that may be a capitalised English word because it follows a name ("Kelly Archer",
        "Wu Fang", "Mark Cross"); function words never are."""
        tokens: list[tuple[int, int]] = []
        size = len(text)
        while len(tokens) < max_tokens:
            m = TOKEN.match(text, pos)
            if not m:
                break
            word = m.group()
            end = m.end()
            if word.endswith(_POSSESSIVE):
                word, end = word[:-2], end - 2
            low = word.lower()
            capital = word[:1].isupper()
            if not capital and low in PARTICLES:
                probe = end
                while True:  # skip "van der", "de la" up to the capitalised word
                    gap = _GAP.match(text, probe)
                    nxt = TOKEN.match(text, gap.end()) if gap else None
                    if nxt is None:
                        break
                    if nxt.group()[:1].isupper():
                        break
                    if nxt.group().lower() not in PARTICLES:
                        nxt = None
                        break
                    probe = nxt.end()
                if nxt is not None and nxt.group()[:1].isupper():
                    pos = nxt.start()
                    continue
                break
            if capital:
                ok = ((any_first and not tokens) or low not in self.common or low in self.surnames or low in self.given
                      or (len(tokens) == surname_at and low not in STOP_WORDS_SET))
            else:
                ok = any_case and (low in self.names or unknown_ok) and low not in self.common
            if not ok or (end < size and (text[end].isdigit() or text[end] in "_@")):
                break
            tokens.append((m.start(), end))
            gap = _GAP.match(text, end)
            if not gap:
                break
            pos = gap.end()
        return tokens

    # -- the tier --------------------------------------------------------------------------

    def _place(self, text: str, start: int, end: int) -> bool:
        span = " ".join(text[start:end].split()).lower()
        if span in self.places:
            return True
        prev = self._prev_word(text, start)
        return bool(prev) and f"{prev} {span}" in self.places

    @staticmethod
    def _particles_before(text: str, start: int) -> int:
        """Where "van der Berg" starts when `start` points at "Berg"."""
        while True:
            lo = max(0, start - 12)
            m = _PARTICLE_BEFORE.search(text[lo:start])
            if m is None:
                return start
            start = lo + m.start()

    def _from_cue(self, text: str, pos: int, cue: str) -> Entity | None:
        """pos: where the word after the cue starts (the gate has skipped the separator)."""
        title = cue in TITLES
        identifying = cue in IDENTIFYING_CUES
        tokens = self._follow(text, pos, 3, any_case=not title, any_first=True, surname_at=1, unknown_ok=identifying)
        if not tokens:
            return None
        start, end = tokens[0][0], tokens[-1][1]
        if title:
            return Entity(PERSON, self._particles_before(text, start), end, 0.85)
        words = [text[a:b] for a, b in tokens]
        first = words[0]
        low = first.lower()
        if first[:1].isupper():
            if low in self.given:
                return Entity(PERSON, start, end, 0.85)
            last = words[-1].lower()
            if len(words) >= 2 and last not in self.common and not self._place(text, start, end):
                return Entity(PERSON, start, end, 0.75)  # "Roan van Dagsburg", "Mücevher Şama"
            # One word alone ("Thanks,\nAdeolu Card number ..." takes "Adeolu").
            first_end = tokens[0][1]
            if (low not in self.common and cue in NAME_CUES
                    and (cue in SIGN_OFFS or not self._place(text, start, first_end))):
                return Entity(PERSON, start, first_end, 0.75)
            return None
        # lowercase after a cue: every word must be a gazetteer name and not an English word
        # (any word that is not English after "my name is")
        if (low in self.names or identifying) and low not in self.common:
            return Entity(PERSON, start, end, 0.8)
        return None

    def _after_weak_cue(self, text: str, pos: int) -> Entity | None:
        """"Ask Akise Tevetoğlu", "for Alamu Adesiyan": two capitalised words that are not
        English words after a word that often precedes a person."""
        tokens = self._follow(text, pos, 3, any_case=False)
        if len(tokens) < 2:
            return None
        words = [text[a:b].lower() for a, b in tokens]
        if words[0] in self.common or words[1] in self.common and words[1] not in self.surnames:
            return None
        start, end = tokens[0][0], tokens[-1][1]
        if self._place(text, start, end):
            return None
        known = words[1] in self.surnames or words[0] in self.given
        return Entity(PERSON, start, end, 0.7 if known else 0.6)

    def find(self, text: str, given_words: list[int], cue_ends: list[tuple[int, str]],
             weak_starts: list[int] = ()) -> list[Entity]:
        """given_words: start offsets of capitalised words that are given names (the engine
        filters the gate's capitalised-word hits by self.given); cue_ends: (start of the word
        after the cue, cue) for strong cues and titles; weak_starts: start of the capitalised
        word after a weak cue."""
        found: list[Entity] = []
        for pos, cue in cue_ends:
            entity = self._from_cue(text, pos, cue)
            if entity is not None:
                found.append(entity)
        for start in weak_starts:
            entity = self._after_weak_cue(text, start)
            if entity is not None:
                found.append(entity)

        covered_until = -1
        common, surnames = self.common, self.surnames
        for start in given_words:
            if start <= covered_until:
                continue
            span = self._token_at(text, start)
            if span is None:
                continue
            low = text[span[0]:span[1]].lower()
            if low not in self.given:
                continue
            gap = _GAP.match(text, span[1])
            ambiguous = low in common
            rest = self._follow(text, gap.end(), 3, any_case=False, surname_at=-1 if ambiguous else 0) if gap else []
            if rest:
                second = text[rest[0][0]:rest[0][1]].lower()
                end = rest[-1][1]
                if not ambiguous:
                    score = 0.85
                elif second not in common or second in surnames:
                    score = 0.7  # "Grace Okafor", "John Vũ", "Will Smith"
                else:
                    score = 0.0
                if score and not self._place(text, span[0], end):
                    found.append(Entity(PERSON, span[0], end, score))
                    covered_until = end
                    continue
            if ambiguous or self.strict or self._place(text, span[0], span[1]):
                continue
            found.append(Entity(PERSON, span[0], span[1], 0.6))
            covered_until = span[1]
        return found
