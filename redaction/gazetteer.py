"""Name gazetteers for the cheap names tier, loaded once per process.

- first names: `gender-guesser`'s nam_dict (≈48,000 given names from 50+ countries) and
  `mimesis`'s person datasets (30+ locales);
- surnames: `mimesis`'s person datasets;
- English words: `data/english_words.txt.gz` (SCOWL, see data/README.md), so that a
  capitalised common word ("Will", "Grace", "Baker") is not taken for a name.

All sets hold lowercase strings. Non-Latin scripts are skipped (the names tier looks for
Latin-script names; other scripts are thorough mode's job).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import sys
import unicodedata
from dataclasses import dataclass
from importlib import resources

# Capitalised in prose without being names, or too short to tell; added to the English list.
EXTRA_COMMON = """
monday tuesday wednesday thursday friday saturday sunday january february march april may june
july august september october november december mon tue tues wed thu thur thurs fri sat sun
jan feb mar apr jun jul aug sep sept oct nov dec today tomorrow yesterday please thanks thank
hi hello hey dear regards cheers best sincerely yes no ok okay sure note step figure table
chapter section appendix example question answer summary overview introduction conclusion
python java kotlin scala rust ruby perl php swift go golang linux windows macos android ios
docker kubernetes kafka redis postgres mysql sql json yaml xml html css http https api sdk
aws azure gcp google amazon microsoft apple meta openai anthropic gemini claude llama mistral
github gitlab slack jira confluence excel word powerpoint outlook teams zoom chrome firefox
safari bash shell unix git npm pip node react angular vue django flask fastapi spring
numpy pandas spark hadoop airflow dbt tableau looker snowflake bigquery redshift
mr mrs ms dr prof sir madam team support admin user customer client manager director
ceo cto cfo vp hr it qa dev ops pm ai ml llm gpt ui ux id url faq tldr eta asap fyi
north south east west new old san santa saint st mount lake river street road avenue
bank university college school hospital city county state republic kingdom united
""".split()

EXTRA_PLACES = """
new york|los angeles|san francisco|san diego|san jose|las vegas|hong kong|tel aviv|rio de janeiro|sao paulo|
são paulo|buenos aires|mexico city|cape town|kuala lumpur|abu dhabi|new delhi|silicon valley|bay area|
london|paris|berlin|munich|hamburg|frankfurt|vienna|zurich|geneva|madrid|barcelona|lisbon|rome|milan|
amsterdam|brussels|dublin|edinburgh|manchester|oslo|stockholm|copenhagen|helsinki|warsaw|prague|
budapest|athens|istanbul|moscow|kyiv|cairo|lagos|nairobi|dubai|mumbai|bangalore|bengaluru|delhi|
singapore|tokyo|osaka|seoul|beijing|shanghai|shenzhen|sydney|melbourne|toronto|vancouver|montreal|
chicago|boston|seattle|austin|denver|dallas|houston|atlanta|miami|york|texas|california|virginia|
georgia|florida|washington|europe|asia|africa|america|oceania|eu|uk|usa|us
""".replace("\n", "").split("|")

# Function words (the word list has "I", "I'm" and friends only capitalised or not at all).
STOP_WORDS = """
i i'm im i've i'd i'll me my mine we us our you your he him his she her it its they them
their a an the and or but if of at by for with about to from in on up down out over under
this that these those is are was were be been am do does did have has had not no yes so
""".split()

# Particles that sit between the parts of a name ("Ludwig van Beethoven", "María de la Cruz").
PARTICLES = frozenset("van von de da di del della der den du la le bin ibn al el dos das ter ten"
                      " y e zu af av".split())


@dataclass(frozen=True)
class Gazetteer:
    first: frozenset[str]
    surnames: frozenset[str]
    common: frozenset[str]
    anglo_first: frozenset[str] = frozenset()
    """First names in use in Great Britain, Ireland or the USA: "Grace", "Will" and "John"
    are English words too, but names there; "In", "The" and "See" are not."""
    places: frozenset[str] = frozenset()
    """Cities, states, countries, continents, nationalities and languages (lowercase, whole
    names: "san francisco", "paris", "german")."""


def _latin(name: str) -> bool:
    for ch in name:
        if ch.isalpha() and not ("LATIN" in unicodedata.name(ch, "")):
            return False
    return True


def _add(target: set, name: str) -> None:
    name = name.strip()
    if len(name) >= 2 and _latin(name):
        target.add(name.lower())


def _first_from_gender_guesser(out: set, anglo: set) -> None:
    import gender_guesser  # noqa: F401  (its data file is what we need)

    path = resources.files("gender_guesser") / "data" / "nam_dict.txt"
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line or line[0] in "#=":
                continue
            parts = line.split()
            if len(parts) < 2:
                continue
            name = parts[1]
            if line[30:33].strip():  # frequency columns of great_britain, ireland, usa
                _add(anglo, name.replace("+", "-"))
            if "+" in name:
                for joined in (name.replace("+", "-"), name.replace("+", "")):
                    _add(out, joined)
                for piece in name.split("+"):
                    _add(out, piece)
            else:
                _add(out, name)


def _mimesis_datasets() -> str:
    """mimesis's data folder, found without importing mimesis (its import loads every
    locale's provider modules: ~75 ms and memory the redactor never uses)."""
    return os.path.join(importlib.util.find_spec("mimesis").submodule_search_locations[0], "datasets")


def _from_mimesis(first: set, surnames: set) -> None:
    root = _mimesis_datasets()
    for locale in sorted(os.listdir(root)):
        path = os.path.join(root, locale, "person.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        names = data.get("names", {})
        for group in (names.values() if isinstance(names, dict) else [names]):
            for name in group:
                for piece in name.replace("-", " ").split():
                    _add(first, piece)
                _add(first, name)
        found = data.get("surnames", data.get("last_names", []))
        for group in (found.values() if isinstance(found, dict) else [found]):
            for name in group:
                _add(surnames, name)
                for piece in name.replace("-", " ").split():
                    if piece.lower() not in PARTICLES:
                        _add(surnames, piece)


def _places_from_mimesis(places: set) -> None:
    root = _mimesis_datasets()

    def take(value) -> None:
        if isinstance(value, str):
            if _latin(value):
                places.add(" ".join(value.split()).lower())
        elif isinstance(value, dict):
            for item in value.values():
                take(item)
        elif isinstance(value, list):
            for item in value:
                take(item)

    for locale in sorted(os.listdir(root)):
        address = os.path.join(root, locale, "address.json")
        if os.path.exists(address):
            with open(address, encoding="utf-8") as handle:
                data = json.load(handle)
            for key in ("city", "continent", "country", "state"):
                take(data.get(key))
        person = os.path.join(root, locale, "person.json")
        if os.path.exists(person):
            with open(person, encoding="utf-8") as handle:
                data = json.load(handle)
            for key in ("nationality", "language"):
                take(data.get(key))
    places.discard("current_locale")


def english_words() -> frozenset[str]:
    path = resources.files("redaction") / "data" / "english_words.txt.gz"
    with path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as handle:
        return frozenset(handle.read().decode("utf-8").split())


@functools.lru_cache(maxsize=1)
def load() -> Gazetteer:
    """Build the gazetteer (≈0.5 s); cached for the life of the process."""
    first: set[str] = set()
    surnames: set[str] = set()
    anglo: set[str] = set()
    _first_from_gender_guesser(first, anglo)
    _from_mimesis(first, surnames)
    common = set(english_words()) | set(EXTRA_COMMON) | set(STOP_WORDS)
    places: set[str] = set(EXTRA_PLACES)
    _places_from_mimesis(places)
    return Gazetteer(first=frozenset(first), surnames=frozenset(surnames), common=frozenset(common),
                     anglo_first=frozenset(anglo), places=frozenset(places))


def _derive(dict_path: str, out_path: str) -> int:
    words = set()
    with open(dict_path, encoding="utf-8") as handle:
        for word in handle:
            word = word.strip()
            if word and "'" not in word and word[0].islower() and word.isalpha() and len(word) >= 2:
                words.add(word)
    with open(out_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write("\n".join(sorted(words)).encode("utf-8"))
    return len(words)


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    if len(sys.argv) == 3 and sys.argv[1] == "--derive":
        target = os.path.join(os.path.dirname(__file__), "data", "english_words.txt.gz")
        print(_derive(sys.argv[2], target), "words ->", target)
    else:
        gaz = load()
        print(f"first names {len(gaz.first)}, surnames {len(gaz.surnames)}, common words {len(gaz.common)}")
