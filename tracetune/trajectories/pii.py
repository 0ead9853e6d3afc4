"""PII scrub: emails, phones, cards, SSNs and structured personal fields become keyed pseudonyms.

Why pseudonyms and not `[REDACTED]`: a `find_customer(email)` trajectory carries the email in the
user text, the tool arguments and the tool results. A keyed hash (HMAC) maps the same value to the
same pseudonym everywhere, so the scrubbed trajectory still reads as one coherent episode (the
model still learns to copy the user's email into the tool call) while the value itself is gone.

Email pseudonyms keep the shape of an email a model will meet in production
(`ana.smith1@example.com` -> `mara.lind0381742290156317@example.com`: made-up first and last
names, 14 keyed digits, a 2-digit public checksum, the original domain) instead of a hex tag:
measured on the embedded default, a model fine-tuned on `user_<hex>@example.invalid` pseudonyms
learned to write that shape, not to copy the user's address, and scored 0% on email tasks. The
checksum lets the detectors recognise a pseudonym and never replace it again (the scrub is
idempotent, and tests scan curated files with the same detectors). Other kinds become
`<kind:16 hex digits>` (`<phone:...>`, `<card:...>`, `<ssn:...>`, `<name:...>`, `<zip:...>`).

Collisions: every pseudonym carries at least 56 keyed bits (emails: 1,000 name pairs x 10^14
numbers = 10^17 values; tags: 64 bits). Two distinct values share a pseudonym with probability
1/N, so n distinct values give about n^2 / 2N collisions: at n = 10M that is 5e-4 for emails and
3e-6 for tags (the old 1,000 x 1,000 email space gave ~50 per 10,000 addresses).

Structured PII (a customer's `name`, `address`, `zip` in a tool result) is found by key
(`ingest.pii.keys`, and `keys_beside` for keys such as `name` that are personal only next to a
person's id), then the same value is replaced the same way in every string of the trajectory:
the user's text, the assistant's answer, other tool results. JSON inside strings (tool results,
arguments) is decoded, scrubbed value by value and written back in its own style, so what was
valid JSON stays valid JSON and numbers (`0.04999999999999716`) are never touched.

The key (docs/data.md "PII"): `ingest.pii.key_env`, else the Prefect Secret block
`ingest.pii.key_block`. A production source without one refuses to run: with a public key,
pseudonyms of guessable values (a known customer's email) can be recomputed. Only the embedded
demo (`ingest.source` is `paths.raw_logs`, the folder the `simulate` stage writes) falls back to
a random per-workspace key in `ingest.pii.demo_key_file`, kept out of data, git and DVC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tracetune.config import PiiParams

if TYPE_CHECKING:
    from tracetune.config import Params

MIN_KEY_CHARS = 16  # a shorter secret can be guessed, which is what a public key allows
EMAIL_DIGITS = 14  # keyed digits in an email pseudonym (module docstring: collisions)
TAG_HEX = 16  # hex digits (64 bits) in `<kind:...>` pseudonyms
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
_PSEUDO_EMAIL = re.compile(rf"([a-z]+)\.([a-z]+)(\d{{{EMAIL_DIGITS}}})(\d{{2}})@(.+)")
_FIRST_SET, _LAST_SET = frozenset(PSEUDO_FIRST), frozenset(PSEUDO_LAST)
_TAG = re.compile(rf"<[a-z_]+:[0-9a-f]{{{TAG_HEX}}}>")

# Emails, Unicode included (`jürgen.müller@example.de`, `josé@example.com`, IDN domains).
_EMAIL = r"(?<![\w.%+-])\w[\w.%+-]*@(?:[\w-]+\.)+[^\W\d_]{2,24}(?![\w-])"
# What `restore_pseudonyms` looks up: a tag, or an address (a pseudonym when `originals` has it).
_ANY_PSEUDONYM = re.compile(rf"<[a-z_]+:[0-9a-f]{{{TAG_HEX}}}>|{_EMAIL}")
# Standalone digit runs only: never inside a float (`0.04999999999999716`), an id (`O-10423`,
# `trace_4111...`) or a longer number. Cards: 13 to 19 digits, grouped by single spaces/dashes.
_CARD = r"(?<![\w.,+-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)"
# US SSNs (AAA-GG-SSSS): area 000, 666 and 9xx, group 00 and serial 0000 are never issued.
_SSN = (
    r"(?<![\w.,+-])(?!000|666|9)\d{3}(?P<ssn_sep>[- ])(?!00)\d{2}(?P=ssn_sep)(?!0000)\d{4}"
    r"(?![\w-]|[.,]\d)"
)
# Phone candidates: an optional + or (, then digits with single separators or parentheses; the
# `phonenumbers` library decides (E.164 and national forms of `phone_region`).
_PHONE = r"(?<![\w+.,/(-])(?<!\d:)[+(]?\d(?:\)?[ .-]?\(?\d){6,15}(?![\w+]|[.,/:-]\d)"
# The shortest text any detector matches: an email `a@b.cd` (phones need 7 digits, SSNs 9,
# cards 13).
_MIN_PII_CHARS = 6
_NOT_PHONE = re.compile(r"\d+\.\d+|.*\d{4}-\d\d-\d\d.*")  # a float, a date
# Cheap test for "could hold PII": an @, a +digit, 7 digits in a row, or digit groups shaped like
# a phone, card or SSN (`555-123-4567`, `(555) 123`, `030 123456`); ISO dates do not pass.
_PREFILTER = re.compile(
    r"@|\+\d|\d(?:\d{6}|\d{1,4}[ ().-]{1,2}\d{6}|\d{2}[ ().-]{1,2}\d{2,4}[ ().-]{1,2}\d{3})"
)
# The same test for ASCII text, ~4x faster: the regex tries its digit alternatives at every
# digit (~8 µs over a 300-character tool result full of prices and dates), so the text is first
# mapped to character classes (`d` a digit, `s` one of ` ().-`, `@`, `+`, `x` any other) where
# each alternative starts with a literal the regex engine can skip to. Between two separator
# runs a digit group is whole, so `\d{2,4}` there is 2, 3 or 4 `d`s in both.
_CLASS_PREFILTER = re.compile(r"dd(?:d{5}|s{1,2}d{6})|ddds{1,2}d{2,4}s{1,2}ddd")


def _class_table() -> bytes:
    """The `bytes.translate` table to `_CLASS_PREFILTER`'s character classes."""
    table = bytearray(b"x" * 256)
    for chars, cls in ((b"0123456789", b"d"), (b" ().-", b"s"), (b"@", b"@"), (b"+", b"+")):
        for char in chars:
            table[char] = cls[0]
    return bytes(table)


_CLASS_TABLE = _class_table()


def _prefilter_passes(text: str) -> bool:
    """`_PREFILTER.search(text) is not None`, exactly (a property test compares the two)."""
    if not text.isascii():
        return _PREFILTER.search(text) is not None
    classes = text.encode("ascii").translate(_CLASS_TABLE).decode("ascii")
    if "@" in classes or "+d" in classes:
        return True
    return "ddd" in classes and _CLASS_PREFILTER.search(classes) is not None


# Whole strings the prefilter passes but no detector can match in: an ISO timestamp with an
# offset (`2026-11-01T00:00:21+00:00`: the `+0` passes) and a dashed id (`tr-100-000000`). In
# both, every digit follows a digit, a letter, `-`, `.`, `:`, `+` or `T`, where no detector may
# start, except the timestamp's first, whose run stops at the `T` after 8 digits. Every
# trajectory has unique ones, so the cache cannot help, and running the detectors over them
# was a tenth of the scrub's time.
_NO_PII_SHAPE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d{1,9})?)?(?:Z|[+-]\d\d:\d\d)?"
    r"|[A-Za-z_]+(?:-\d+)+",
    re.ASCII,
)
# Where a detector match can start (a superset; `_match_starts`): a digit, `+` or `(` after
# none of `\w.,+-` (every digit detector's lookbehind refuses those), or the first character of
# the run of email characters right before an `@`. The combined detector regex tries its four
# alternatives, each behind a lookbehind, at every position of a string (~5 µs over a
# 26-character answer); trying it only at these positions finds the same matches.
_DIGIT_START = re.compile(r"[\d+(](?<![\w.,+-].)")
# JSON escapes in raw (undecodable) text: the scrub runs between them.
_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|.)", re.S)
_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


class PiiKeyMissing(RuntimeError):
    """A production source and no secret key: pseudonyms with a public key can be reversed."""


@dataclass(frozen=True)
class PiiKey:
    value: bytes
    origin: str  # where it came from, for the ingest report (never the key itself)

    def __repr__(self) -> str:  # a key never lands in a log or a traceback
        return f"PiiKey(origin={self.origin!r})"


def luhn_ok(digits: str) -> bool:
    """The card checksum: every real card number passes it, ~90% of random digit runs fail."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# --- the key ------------------------------------------------------------------------------------
def is_demo_source(source: str, raw_logs: Path) -> bool:
    """The embedded demo: ingest reads the folder the `simulate` stage writes, nothing else.

    Any other source (another folder, a file, S3) is production and needs a secret key.
    """
    if "://" in source:
        return False
    return Path(source).resolve() == Path(raw_logs).resolve()


def resolve_key(params: PiiParams, demo: bool) -> PiiKey:
    """The pseudonym key: environment variable, else Prefect Secret block, else (demo only) the
    workspace file; raises `PiiKeyMissing` for a production source without a secret."""
    value = os.environ.get(params.key_env, "")
    if value:
        return _checked(value, f"environment variable {params.key_env}")
    if params.key_block:
        return _checked(_prefect_secret(params.key_block), f"Prefect Secret {params.key_block}")
    if demo:
        path = params.demo_key_file
        return PiiKey(workspace_key(path), f"demo workspace key {path}")
    raise PiiKeyMissing(
        f"no PII pseudonym key: set the environment variable {params.key_env} (or "
        "ingest.pii.key_block, a Prefect Secret block) to a secret of at least "
        f"{MIN_KEY_CHARS} characters. Only the embedded demo (ingest.source = paths.raw_logs) "
        "runs without one (docs/data.md, PII)"
    )


def key_for(params: Params, root: Path | None = None) -> PiiKey:
    """The key every stage uses with these params (ingest, split, evaluation agree on it).

    Relative paths are the repository's (`root`, default: the working directory, as in stages).
    """
    base = Path.cwd() if root is None else Path(root)
    source = params.ingest.source
    local = source if "://" in source else str(base / source)
    demo = is_demo_source(local, base / params.paths.raw_logs)
    pii = params.ingest.pii
    pii = pii.model_copy(update={"demo_key_file": base / pii.demo_key_file})
    return resolve_key(pii, demo)


def workspace_key(path: Path) -> bytes:
    """The demo's random key, made once per workspace (0600, its folder gitignored)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ignore = path.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# tracetune's per-workspace secrets: never commit them\n*\n")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    value = path.read_text().strip()
    if len(value) < MIN_KEY_CHARS:
        raise PiiKeyMissing(f"{path} holds no usable key: delete it to make a new one")
    return value.encode()


_PLACEHOLDERS = ("change-me", "replace-me", "changeme", "replaceme")  # infra examples' values


def _checked(value: str, origin: str) -> PiiKey:
    if value.strip().lower().startswith(_PLACEHOLDERS):
        raise PiiKeyMissing(f"the PII key from {origin} is the example's placeholder: set a secret")
    if len(value) < MIN_KEY_CHARS:
        raise PiiKeyMissing(
            f"the PII key from {origin} has {len(value)} characters; at least {MIN_KEY_CHARS}"
            " are needed (a short key can be guessed)"
        )
    return PiiKey(value.encode(), origin)


def _prefect_secret(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name, _sync=True)  # type: ignore[call-arg]
        value = block.get()  # type: ignore[union-attr]
    except ValueError as exc:
        raise PiiKeyMissing(f"Prefect Secret block {name!r} cannot be read: {exc}") from None
    return str(value)


# --- the scrubber -------------------------------------------------------------------------------
class Scrubber:
    """Replaces PII in strings with keyed pseudonyms and counts what it replaced.

    Picklable (worker processes get a copy). The pseudonym cache is bounded: values repeat a lot
    (the same customers), but memory must not grow with the input.
    """

    CACHE_LIMIT = 20_000  # entries per cache: a few MB at most

    def __init__(self, params: PiiParams, key: bytes, *, remember: bool = False) -> None:
        self.params = params
        self.key = key
        # pseudonym -> the value it replaced, kept only when asked (serving restores values in
        # the model's tool arguments and answers; ingest never keeps them: memory and privacy).
        self.originals: dict[str, str] | None = {} if remember else None
        kinds = []
        if params.emails:
            kinds.append(f"(?P<email>{_EMAIL})")
        if params.cards:
            kinds.append(f"(?P<card>{_CARD})")
        if params.ssns:
            kinds.append(f"(?P<ssn>{_SSN})")
        if params.phones:
            kinds.append(f"(?P<phone>{_PHONE})")
        self._always = {k.lower(): _key_kind(k) for k in params.keys}
        self._beside = {
            k.lower(): frozenset(v.lower() for v in vs) for k, vs in params.keys_beside.items()
        }
        names = sorted(set(self._always) | set(self._beside), key=len, reverse=True)
        self._key_hint = (
            re.compile("|".join(rf'"{re.escape(k)}"' for k in names), re.I) if names else None
        )
        self._ascii_key_hint = _ascii_key_hint(names)
        self.enabled = params.enabled and bool(kinds or names)
        self._pattern = re.compile("|".join(kinds)) if kinds else None
        self._cache: dict[tuple[str, str], str] = {}
        self._texts: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}
        self._keyed: dict[str, tuple[tuple[str, str], ...]] = {}
        self.counts: Counter[str] = Counter()  # every replacement so far, by kind
        self.hits: Counter[str] = Counter()  # replacements since the caller last cleared it

    # --- pseudonyms ---------------------------------------------------------------------------
    def pseudonym(self, kind: str, value: str) -> str:
        norm = _normalise(kind, value, self.params.phone_region)
        cached = self._cache.get((kind, norm))
        if cached is None:
            digest = hmac.new(self.key, f"{kind}:{norm}".encode(), hashlib.sha256).digest()
            if kind == "email":
                cached = _email_pseudonym(digest, norm)
            else:
                cached = f"<{kind}:{digest.hex()[:TAG_HEX]}>"
            if len(self._cache) >= self.CACHE_LIMIT:
                self._cache.clear()
            self._cache[(kind, norm)] = cached
        if self.originals is not None:
            self.originals.setdefault(cached, value)
        return cached

    def _count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.hits[kind] += n

    def _replace(self, match: re.Match[str]) -> str:
        kind = self._detected(match)
        if kind is None:
            return match.group(0)
        self._count(kind)
        return self.pseudonym(kind, match.group(0))

    def _detected(self, match: re.Match[str]) -> str | None:
        """The kind of PII a detector match is, or None (a pseudonym, a failed check)."""
        kind = match.lastgroup or ""
        value = match.group(0)
        if kind == "email" and is_email_pseudonym(value):
            return None  # already a pseudonym
        if kind == "card" and self.params.card_luhn and not luhn_ok(re.sub(r"\D", "", value)):
            return None
        if kind == "phone" and self._phone(value) is None:
            return None
        return kind

    def _phone(self, value: str) -> str | None:
        """E.164 form when `phonenumbers` says the text is a possible phone number."""
        digits = sum(c.isdigit() for c in value)
        if not self.params.phone_min_digits <= digits <= 15 or _NOT_PHONE.fullmatch(value):
            return None
        return _e164(value, self.params.phone_region)

    # --- scrubbing ----------------------------------------------------------------------------
    def scrub_text(self, text: str) -> str:
        """`text` with every detected PII value replaced (unchanged when none is found).

        Results are cached (bounded): system prompts and tool results repeat across thousands of
        trajectories, and scanning them again is most of the cost of the scrub.
        """
        if not self.enabled or len(text) < 6:
            return text
        cached = self._texts.get(text)
        if cached is not None:
            out, hits = cached
            for kind, n in hits:
                self._count(kind, n)
            return out
        if len(self._texts) >= self.CACHE_LIMIT:
            self._texts.clear()
        if not self._may_hold_pii(text):  # most strings: ids, prose, results without PII
            self._texts[text] = (text, ())
            return text
        before = dict(self.hits)
        out = self._scrub_string(text)
        hits = tuple(
            (k, n - before.get(k, 0)) for k, n in self.hits.items() if n != before.get(k, 0)
        )
        self._texts[text] = (out, hits)
        return out

    def _may_hold_pii(self, text: str) -> bool:
        if _prefilter_passes(text):
            return _NO_PII_SHAPE.fullmatch(text) is None
        return _is_json_shaped(text) and bool(self._keyed_of(text))

    def _any_pii(self, text: str) -> bool:
        if self._pattern is None or not _prefilter_passes(text):
            return False
        return any(self._detected(m) is not None for m in self._finditer(text))

    def _scrub_string(self, text: str) -> str:
        """One string: JSON inside is scrubbed value by value, other text by the detectors."""
        if _is_json_shaped(text):
            if "\\" not in text and not self._keyed_of(text) and not self._any_pii(text):
                return text  # no escape can hide a value, no PII key, no detector match
            try:
                decoded = orjson.loads(text)
            except orjson.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict | list):
                return self._scrub_json(text, decoded)
        if self._pattern is not None and _prefilter_passes(text):
            text = self._sub(text)
        return text

    def _sub(self, text: str) -> str:
        """`self._pattern.sub(self._replace, text)`, the same result (no match is empty)."""
        out: list[str] = []
        at = 0
        for match in self._finditer(text):
            out += [text[at : match.start()], self._replace(match)]
            at = match.end()
        if not out:
            return text
        out.append(text[at:])
        return "".join(out)

    def _finditer(self, text: str) -> Iterator[re.Match[str]]:
        """`self._pattern.finditer(text)`, the same matches, tried only where one can start."""
        pattern = self._pattern
        if pattern is None:
            return
        match, end = pattern.match, 0
        for start in _match_starts(text):
            if start >= end and (found := match(text, start)) is not None:
                yield found
                end = found.end()

    def _scrub_json(self, text: str, decoded: Any) -> str:
        """JSON text -> the same JSON with PII values replaced, in the text's own style."""
        changed = False
        stack = [decoded]
        while stack:
            node = stack.pop()
            if isinstance(node, dict) and self._scrub_keys(node):
                changed = True
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            for key, value in items:
                kind = self._kind_of(str(key), node) if isinstance(node, dict) else None
                if kind is not None and _is_value(value):
                    if _is_pseudonym_value(str(value)):
                        continue
                    new: Any = self._keyed_pseudonym(kind, str(value))
                    self._count(kind)
                elif isinstance(value, str):
                    new = self._scrub_string(value) if len(value) >= 2 else value
                elif isinstance(value, dict | list):
                    stack.append(value)
                    continue
                else:
                    continue
                if new != value:
                    node[key] = new
                    changed = True
        return _dumps_like(text, decoded) if changed else text

    def _scrub_keys(self, node: dict[str, Any]) -> bool:
        """Rename keys that are PII (`{"ana@example.com": {...}}`), keeping their order."""
        pattern = self._pattern
        if pattern is None or not any(_prefilter_passes(k) for k in node):
            return False
        renamed = {self._sub(k): v for k, v in node.items()}
        if list(renamed) == list(node):
            return False
        node.clear()
        node.update(renamed)
        return True

    def _kind_of(self, key: str, node: dict[str, Any]) -> str | None:
        """The pseudonym kind when `node[key]` is PII by its key, else None."""
        low = key.lower()
        kind = self._always.get(low)
        if kind is not None:
            return kind
        beside = self._beside.get(low)
        if beside and any(k.lower() in beside for k in node if k != key):
            return _key_kind(low)
        return None

    def _keyed_pseudonym(self, kind: str, value: str) -> str:
        if kind == "phone" and (e164 := self._phone(value)) is not None:
            return self.pseudonym("phone", e164)
        return self.pseudonym(kind, value)

    def scrub_obj(self, obj: Any) -> Any:
        """Scrub every string value of a JSON-like object in place (dict keys are left alone).

        Works on decoded values, never on JSON text: a regex over JSON text would meet escapes
        (`\\n555-123-4567`, `\\u00f6`) and either miss PII or break the document. Values found
        by key in structured tool results are replaced the same way in every string of `obj`.
        """
        if not self.enabled or not isinstance(obj, dict | list):
            return obj
        scrub, seen = self.scrub_text, self._texts.get
        keyed, keyed_of = self._keyed.get, self._keyed_of
        found: dict[str, str] = {}
        stack = [obj]
        while stack:
            node = stack.pop()
            items = node.items() if type(node) is dict else enumerate(node)
            for key, value in items:
                kind = type(value)
                if kind is str:
                    if value[:1] in "{[" and len(value) >= 8:  # structured: PII by key
                        pairs = keyed(value)
                        for pii_kind, pii_value in keyed_of(value) if pairs is None else pairs:
                            found.setdefault(pii_value, pii_kind)
                    # Inlined cache test: most strings were seen before and hold no PII, and a
                    # call per string was a third of the ingest stage's time.
                    if len(value) >= 6 and ((hit := seen(value)) is None or hit[1]):
                        node[key] = scrub(value)
                elif kind is dict or kind is list:
                    stack.append(value)
        if found:  # the same values wherever else they appear (user text, answers, ids)
            self._apply_found(obj, found)
        return obj

    def _apply_found(self, obj: dict[str, Any] | list[Any], found: dict[str, str]) -> None:
        """`_strings(obj)` inlined (a generator and a list per node cost more than the test):
        strings that hold a found value get it replaced. Values are reassigned under existing
        keys only, so walking the live containers is safe."""
        values: _Values | None = None
        literals = tuple(found)
        stack: list[Any] = [obj]
        while stack:
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(value, str):
                    # A loop, not `any(<generator>)`: a generator per string was most of the
                    # pass, which usually finds nothing (the tool result itself is scrubbed).
                    for literal in literals:
                        if literal in value:
                            values = values or _Values(found)
                            node[key] = self._apply_values(value, values)
                            break
                elif isinstance(value, _CONTAINERS):
                    stack.append(value)

    def _keyed_of(self, text: str) -> tuple[tuple[str, str], ...]:
        """(kind, value) of every PII-key value in a JSON text (cached; () for most texts)."""
        keyed = self._keyed.get(text)
        if keyed is None:
            ok = _is_json_shaped(text) and self._has_key_hint(text)
            keyed = self._keyed_values(text) if ok else ()
            if len(self._keyed) >= self.CACHE_LIMIT:
                self._keyed.clear()
            self._keyed[text] = keyed
        return keyed

    def _has_key_hint(self, text: str) -> bool:
        """A PII key's name in quotes, in any case, somewhere in `text`.

        ASCII text is lowered and searched case-sensitively: the same answer for ASCII keys,
        ~5x faster over a tool result full of quoted keys (every quote tried each key).
        """
        if self._ascii_key_hint is not None and text.isascii():
            return self._ascii_key_hint.search(text.lower()) is not None
        hint = self._key_hint
        return hint is not None and hint.search(text) is not None

    def _apply_values(self, text: str, values: _Values) -> str:
        """Replace the trajectory's keyed values in one string (JSON inside stays JSON)."""
        if _is_json_shaped(text):
            try:
                decoded = orjson.loads(text)
            except orjson.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict | list):
                changed = False
                for node, key, value in list(_strings(decoded)):
                    new = self._apply_values(value, values)
                    if new != value:
                        node[key] = new
                        changed = True
                return _dumps_like(text, decoded) if changed else text
        return values.sub(text, self)

    def _keyed_values(self, text: str) -> tuple[tuple[str, str], ...]:
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            return ()
        out = []
        stack = [decoded]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for key, value in node.items():
                    kind = self._kind_of(key, node)
                    if kind is not None and _is_value(value) and len(str(value).strip()) >= 2:
                        if not _is_pseudonym_value(str(value)):
                            out.append((kind, str(value)))
                    elif isinstance(value, dict | list):
                        stack.append(value)
            elif isinstance(node, list):
                stack.extend(v for v in node if isinstance(v, dict | list))
        return tuple(out)

    def scrub_raw(self, text: str) -> str:
        """Raw log text for the quarantine, scrubbed like an accepted record.

        Valid JSON goes through `scrub_obj`. Text that does not parse (a truncated record) is
        scrubbed between its JSON escapes (`\\n555-123-4567` is found) after `\\uXXXX` escapes
        are decoded (`j\\u00fcrgen@...`), and `"key": "value"` pairs of PII keys are replaced
        even where the key is personal only beside another (the neighbours may be cut off).
        """
        if not self.enabled or not text:
            return text
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            decoded = _UNPARSED
        if decoded is not _UNPARSED:
            if isinstance(decoded, str):
                return json.dumps(self.scrub_text(decoded), ensure_ascii=False)
            return json.dumps(self.scrub_obj(decoded), ensure_ascii=False)
        text = _UNICODE_ESCAPE.sub(_unescape, text)
        text = self._raw_pairs().sub(self._replace_pair, text)
        pieces = _ESCAPE.split(text)
        escapes = _ESCAPE.findall(text)
        out = [self._scrub_string(pieces[0])]
        for escape, piece in zip(escapes, pieces[1:], strict=True):
            out += [escape, self._scrub_string(piece)]
        return "".join(out)

    def _raw_pairs(self) -> re.Pattern[str]:
        names = sorted(set(self._always) | set(self._beside), key=len, reverse=True) or ["\x00"]
        alt = "|".join(re.escape(n) for n in names)
        return re.compile(
            rf'(?P<head>\\*"(?P<key>{alt})\\*"\s*:\s*)'
            rf'(?:(?P<q>\\*")(?P<s>(?:[^"\\]|\\u[0-9a-fA-F]{{4}})*)(?P=q)|(?P<n>-?\d[\d.eE+-]*))',
            re.I,
        )

    def _replace_pair(self, m: re.Match[str]) -> str:
        value = m.group("s") if m.group("s") is not None else m.group("n")
        if not value or _is_pseudonym_value(value):
            return m.group(0)
        key = m.group("key").lower()
        kind = self._always.get(key) or _key_kind(key)
        pseudonym = self._keyed_pseudonym(kind, value)
        self._count(kind)
        quote = m.group("q") or ""
        return f"{m.group('head')}{quote}{pseudonym}{quote}"


class _Values:
    """Values found by key in one trajectory, replaced wherever they appear in its text."""

    def __init__(self, found: dict[str, str]) -> None:
        self.kinds = found
        ordered = sorted(found, key=len, reverse=True)
        alt = "|".join(re.escape(v) for v in ordered)
        self.pattern = re.compile(rf"(?<![\w.-])(?:{alt})(?![\w-]|\.\w)")

    def sub(self, text: str, scrubber: Scrubber) -> str:
        def repl(m: re.Match[str]) -> str:
            kind = self.kinds[m.group(0)]
            scrubber._count(kind)
            return scrubber._keyed_pseudonym(kind, m.group(0))

        return self.pattern.sub(repl, text)


_UNPARSED = object()
_CONTAINERS = (dict, list)  # `isinstance(x, dict | list)` builds the union on every call


@functools.cache
def _detector() -> Scrubber:
    """The default detectors, for checks only (its key never makes an output)."""
    return Scrubber(PiiParams(), key=b"detector-only: never used for an output")


def find_pii(text: str) -> list[str]:
    """PII values present in `text` (pseudonyms excluded): the check tests and gates use."""
    detector = _detector()
    pattern = detector._pattern
    if pattern is None or not _prefilter_passes(text):
        return []
    return [m.group(0) for m in detector._finditer(text) if detector._replace(m) != m.group(0)]


def pii_in(obj: Any) -> list[str]:
    """PII values in every string of a JSON-like object (decoded, so escapes cannot hide any),
    in the order a depth-first walk meets them.

    Walked with a stack; only strings long enough to hold a match (`_MIN_PII_CHARS`) that pass
    the prefilter and are not a whole timestamp or dashed id (`_NO_PII_SHAPE`, where no
    detector matches: the scrub skips them too) go to the detectors. The curated gate checks
    every string of every curated trajectory: a call per value was a third of its rows' cost.
    """
    if isinstance(obj, str):
        return find_pii(obj)
    strings: list[str] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if len(node) >= _MIN_PII_CHARS:
                strings.append(node)
        elif isinstance(node, dict):
            stack.extend(reversed(node.values()))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    hits: list[str] = []
    for text in strings:
        if _prefilter_passes(text) and _NO_PII_SHAPE.fullmatch(text) is None:
            hits += find_pii(text)
    return hits


def _pii_in_recursive(obj: Any) -> list[str]:
    """`pii_in` as it was first written (the reference its tests compare with)."""
    if isinstance(obj, str):
        return find_pii(obj)
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return [hit for value in values for hit in _pii_in_recursive(value)]


def restore_pseudonyms(text: str, originals: dict[str, str]) -> str:
    """`text` with every pseudonym in `originals` replaced by the value it stands for (others,
    e.g. one a model made up, stay as they are)."""
    if not originals or ("<" not in text and "@" not in text):
        return text
    return _ANY_PSEUDONYM.sub(lambda m: originals.get(m.group(0), m.group(0)), text)


def has_pseudonym(text: str) -> bool:
    """True when `text` holds a pseudonym this module wrote."""
    if "<" in text and _TAG.search(text):
        return True
    return "@" in text and any(is_email_pseudonym(m) for m in re.findall(_EMAIL, text))


def _match_starts(text: str) -> list[int]:
    """Every position where a detector match may start, in order (`_DIGIT_START`).

    An email match starts after none of `\\w.%+-` and runs over `\\w.%+-` to its `@`: it can
    only start where the run of those characters before an `@` starts (`\\w` is `isalnum()`
    or `_`, as in `re`).
    """
    starts = [m.start() for m in _DIGIT_START.finditer(text)]
    at = text.find("@")
    if at < 0:
        return starts
    emails = set()
    while at >= 0:
        i = at
        while i and (text[i - 1].isalnum() or text[i - 1] in "_.%+-"):
            i -= 1
        if i < at:
            emails.add(i)
        at = text.find("@", at + 1)
    return sorted(emails.union(starts))


def _ascii_key_hint(names: list[str]) -> re.Pattern[str] | None:
    """`Scrubber._key_hint` for lowered ASCII text, when every (lowered) key name is ASCII."""
    if not names or not all(name.isascii() for name in names):
        return None
    return re.compile("|".join(rf'"{re.escape(name)}"' for name in names))


def _key_kind(key: str) -> str:
    """The pseudonym kind of a PII key: phones share the detector's pseudonyms, names one tag."""
    low = key.lower()
    if low in ("phone", "phone_number", "mobile"):
        return "phone"
    if low == "email":
        return "email"
    if "name" in low:
        return "name"
    return re.sub(r"[^a-z_]", "_", low)[:24] or "pii"


def _normalise(kind: str, value: str, region: str) -> str:
    if kind == "email":
        return unicodedata.normalize("NFC", value).lower()
    if kind == "phone":
        return _e164(value, region) or re.sub(r"\D", "", value)
    if kind in ("card", "ssn"):
        return re.sub(r"\D", "", value)
    return " ".join(unicodedata.normalize("NFC", value).casefold().split())


@functools.lru_cache(maxsize=20_000)
def _e164(value: str, region: str) -> str | None:
    import phonenumbers

    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _is_value(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool) and value != ""


def _is_pseudonym_value(value: str) -> bool:
    return bool(_TAG.fullmatch(value)) or is_email_pseudonym(value)


def _is_json_shaped(text: str) -> bool:
    head, tail = text[:1], text[-1:]
    return (head == "{" and tail == "}") or (head == "[" and tail == "]")


def _dumps_like(text: str, decoded: Any) -> str:
    """`decoded` written back as JSON in the style of the text it came from."""
    ensure_ascii, separators = _json_style(text)
    return json.dumps(decoded, ensure_ascii=ensure_ascii, separators=separators)


def _json_style(text: str) -> tuple[bool, tuple[str, str] | None]:
    """(ensure_ascii, separators) of a JSON text, so that a rewrite keeps its look."""
    compact = '":' in text and '": ' not in text and ", " not in text
    return text.isascii() and "\\u" in text, ((",", ":") if compact else None)


def _unescape(m: re.Match[str]) -> str:
    char = chr(int(m.group(1), 16))
    if char in '"\\' or not char.isprintable() or 0xD800 <= ord(char) <= 0xDFFF:
        return m.group(0)
    return char


def _strings(obj: Any) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, string) for every string value in a JSON-like object."""
    stack = [obj]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, value in items:
            if isinstance(value, str):
                yield node, key, value
            elif isinstance(value, dict | list):
                stack.append(value)


def _checksum(name: str) -> str:
    return f"{zlib.crc32(name.encode()) % 100:02d}"


def _email_pseudonym(digest: bytes, email: str) -> str:
    """`first.lastNNNNNNNNNNNNNNCC@domain`: names and digits keyed, CC the public checksum."""
    first = PSEUDO_FIRST[digest[0] % len(PSEUDO_FIRST)]
    last = PSEUDO_LAST[digest[1] % len(PSEUDO_LAST)]
    number = int.from_bytes(digest[2:10], "big") % 10**EMAIL_DIGITS
    domain = email.rsplit("@", 1)[-1]
    name = f"{first}.{last}{number:0{EMAIL_DIGITS}d}@{domain}"
    return f"{first}.{last}{number:0{EMAIL_DIGITS}d}{_checksum(name)}@{domain}"


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
