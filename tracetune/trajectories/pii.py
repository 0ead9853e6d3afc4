"""PII scrub: emails, phone numbers and card-like numbers become keyed pseudonyms.

Why pseudonyms and not `[REDACTED]`: a `find_customer(email)` trajectory carries the email in the
user text, the tool arguments and the tool results. A keyed hash (HMAC) maps the same value to the
same pseudonym everywhere, so the scrubbed trajectory still reads as one coherent episode (the
model still learns to copy the user's email into the tool call) while the value itself is gone.

Email pseudonyms keep the shape of an email a model will meet in production
(`ana.smith1@example.com` -> `mara.lind03817@example.com`: made-up first and last names, digits,
the original domain) instead of a hex tag: measured on the embedded default, a model fine-tuned
on `user_<hex>@example.invalid` pseudonyms learned to write that shape, not to copy the user's
address, and scored 0% on email tasks. The last two digits are a public checksum of the rest, so
the detectors recognise a pseudonym and never replace it again (the scrub is idempotent, and tests
scan curated files with the same detectors). The price: a real address that happens to have
exactly this shape, names from our lists and a matching checksum (about 1 in 100 of those) is
taken for a pseudonym and kept. Phones and cards become `<phone:tag>` / `<card:tag>`.

The key comes from an environment variable (`ingest.pii.key_env`); without it a fixed
development key is used and the ingest metrics say so: with a public key, pseudonyms of guessable
values (an email of a known customer) can be recomputed, so production sets a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import zlib
from collections import Counter
from typing import Any

from tracetune.config import PiiParams

DEV_KEY = b"tracetune-development-key"
PSEUDONYM_DOMAIN = "example.invalid"  # earlier pseudonyms (`user_<hex>@example.invalid`)
PSEUDO_FIRST = (
    "ada",
    "alba",
    "arne",
    "bela",
    "cato",
    "dario",
    "edda",
    "elin",
    "faro",
    "gita",
    "hale",
    "ines",
    "iver",
    "jara",
    "joss",
    "kaja",
    "lale",
    "lior",
    "mara",
    "milo",
    "nela",
    "niko",
    "oda",
    "olin",
    "pera",
    "quin",
    "rada",
    "remi",
    "sela",
    "siv",
    "tala",
    "teo",
    "ulla",
    "vada",
    "vito",
    "wela",
    "yara",
    "yoel",
    "zana",
    "zeno",
)
PSEUDO_LAST = (
    "aberg",
    "bardo",
    "castel",
    "dunmore",
    "ekdal",
    "falk",
    "gerrit",
    "holm",
    "ilves",
    "jarva",
    "kestner",
    "lind",
    "moravec",
    "norberg",
    "ostrom",
    "pellan",
    "quist",
    "rask",
    "sandell",
    "tamsin",
    "ulver",
    "varga",
    "wendt",
    "ystad",
    "zorn",
)
_PSEUDO_EMAIL = re.compile(r"([a-z]+)\.([a-z]+)(\d{3})(\d{2})@(.+)")
_FIRST_SET, _LAST_SET = frozenset(PSEUDO_FIRST), frozenset(PSEUDO_LAST)

# Emails: a conservative RFC 5322 subset (what real logs hold).
_EMAIL = r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])"
# Card-like: 13 to 19 digits, optionally grouped by single spaces or dashes.
_CARD = r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"
# Phones: optional +country code, then three groups separated by space/dot/dash; the digit count
# (9 to 15, E.164) is checked after the match, so dates (2026-10-09) and ids (O-10423) never match.
_PHONE = (
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"
)
# Cheap test for "could hold PII": an @, a grouped digit run (phones, spaced cards) or a long one.
_PREFILTER = re.compile(r"@|\d{3,4}[ .-]\d{3,4}|\d{13}")


def luhn_ok(digits: str) -> bool:
    """The card checksum: every real card number passes it, ~90% of random digit runs fail."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def resolve_key(params: PiiParams) -> tuple[bytes, bool]:
    """(key, is_secret): the secret from the environment, or the public development key."""
    value = os.environ.get(params.key_env, "")
    return (value.encode(), True) if value else (DEV_KEY, False)


class Scrubber:
    """Replaces PII in strings with keyed pseudonyms and counts what it replaced.

    Picklable (worker processes get a copy). The pseudonym cache is bounded: values repeat a lot
    (the same customers), but memory must not grow with the input.
    """

    CACHE_LIMIT = 20_000  # entries per cache: a few MB at most

    def __init__(self, params: PiiParams, key: bytes | None = None) -> None:
        self.params = params
        self.key = key if key is not None else resolve_key(params)[0]
        kinds = []
        if params.emails:
            kinds.append(f"(?P<email>{_EMAIL})")
        if params.cards:
            kinds.append(f"(?P<card>{_CARD})")
        if params.phones:
            kinds.append(f"(?P<phone>{_PHONE})")
        self.enabled = params.enabled and bool(kinds)
        self._pattern = re.compile("|".join(kinds)) if kinds else None
        self._cache: dict[tuple[str, str], str] = {}
        self._texts: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}
        self.counts: Counter[str] = Counter()  # every replacement so far, by kind
        self.hits: Counter[str] = Counter()  # replacements since the caller last cleared it

    # --- pseudonyms ---------------------------------------------------------------------------
    def pseudonym(self, kind: str, value: str) -> str:
        norm = value.lower() if kind == "email" else re.sub(r"\D", "", value)
        cached = self._cache.get((kind, norm))
        if cached is not None:
            return cached
        digest = hmac.new(self.key, f"{kind}:{norm}".encode(), hashlib.sha256).digest()
        out = _email_pseudonym(digest, norm) if kind == "email" else f"<{kind}:{digest.hex()[:10]}>"
        if len(self._cache) >= self.CACHE_LIMIT:
            self._cache.clear()
        self._cache[(kind, norm)] = out
        return out

    def _replace(self, match: re.Match[str]) -> str:
        kind = match.lastgroup or ""
        value = match.group(0)
        if kind == "email" and is_email_pseudonym(value):
            return value  # already a pseudonym
        if kind == "card" and self.params.card_luhn and not luhn_ok(re.sub(r"\D", "", value)):
            return value
        if kind == "phone" and not 9 <= sum(c.isdigit() for c in value) <= 15:
            return value
        self.counts[kind] += 1
        self.hits[kind] += 1
        return self.pseudonym(kind, value)

    # --- scrubbing ----------------------------------------------------------------------------
    def scrub_text(self, text: str) -> str:
        """`text` with every detected PII value replaced (unchanged when none is found).

        Results are cached (bounded): system prompts and tool results repeat across thousands of
        trajectories, and scanning them again is most of the cost of the scrub.
        """
        if not self.enabled or self._pattern is None or len(text) < 6:
            return text
        cached = self._texts.get(text)
        if cached is not None:
            out, hits = cached
            for kind, n in hits:
                self.counts[kind] += n
                self.hits[kind] += n
            return out
        if len(self._texts) >= self.CACHE_LIMIT:
            self._texts.clear()
        if not _PREFILTER.search(text):  # most strings: ids, names, prose without PII
            self._texts[text] = (text, ())
            return text
        before = dict(self.hits)
        out = self._pattern.sub(self._replace, text)
        hits = tuple(
            (k, n - before.get(k, 0)) for k, n in self.hits.items() if n != before.get(k, 0)
        )
        self._texts[text] = (out, hits)
        return out

    def scrub_obj(self, obj: Any) -> Any:
        """Scrub every string value of a JSON-like object in place (dict keys are left alone).

        Works on decoded values, never on JSON text: a regex over JSON text would meet escapes
        (`\\n555-123-4567`, `\\u00f6`) and either miss PII or break the document.
        """
        if not self.enabled or not isinstance(obj, dict | list):
            return obj
        scrub, seen = self.scrub_text, self._texts.get
        stack = [obj]
        while stack:
            node = stack.pop()
            items = node.items() if type(node) is dict else enumerate(node)
            for key, value in items:
                kind = type(value)
                if kind is str:
                    # Inlined cache test: most strings were seen before and hold no PII, and a
                    # call per string was a third of the ingest stage's time.
                    if len(value) >= 6 and ((hit := seen(value)) is None or hit[1]):
                        node[key] = scrub(value)
                elif kind is dict or kind is list:
                    stack.append(value)
        return obj


_DETECTOR = Scrubber(PiiParams(card_luhn=False), key=DEV_KEY)


def find_pii(text: str) -> list[str]:
    """PII values present in `text` (pseudonyms excluded): the check tests and gates use."""
    pattern = _DETECTOR._pattern
    if pattern is None or not _PREFILTER.search(text):
        return []
    return [m.group(0) for m in pattern.finditer(text) if _DETECTOR._replace(m) != m.group(0)]


def pii_in(obj: Any) -> list[str]:
    """PII values in every string of a JSON-like object (decoded, so escapes cannot hide any)."""
    if isinstance(obj, str):
        return find_pii(obj)
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return [hit for value in values for hit in pii_in(value)]


def has_pseudonym(text: str) -> bool:
    """True when `text` holds a pseudonym this module wrote."""
    if "<phone:" in text or "<card:" in text:
        return True
    return "@" in text and any(is_email_pseudonym(m) for m in re.findall(_EMAIL, text))


def _checksum(name: str) -> str:
    return f"{zlib.crc32(name.encode()) % 100:02d}"


def _email_pseudonym(digest: bytes, email: str) -> str:
    """`first.lastNNNCC@domain`: names and NNN from the keyed digest, CC the public checksum."""
    first = PSEUDO_FIRST[digest[0] % len(PSEUDO_FIRST)]
    last = PSEUDO_LAST[digest[1] % len(PSEUDO_LAST)]
    number = int.from_bytes(digest[2:4], "big") % 1000
    domain = email.rsplit("@", 1)[-1]
    name = f"{first}.{last}{number:03d}@{domain}"
    return f"{first}.{last}{number:03d}{_checksum(name)}@{domain}"


def is_email_pseudonym(value: str) -> bool:
    """An address this module wrote (current shape), or a reserved `.invalid` one (RFC 6761)."""
    value = value.lower()
    if value.endswith(".invalid"):
        return True
    m = _PSEUDO_EMAIL.fullmatch(value)
    if m is None or m.group(1) not in _FIRST_SET or m.group(2) not in _LAST_SET:
        return False
    name = f"{m.group(1)}.{m.group(2)}{m.group(3)}@{m.group(5)}"
    return m.group(4) == _checksum(name)
