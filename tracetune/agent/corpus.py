"""A synthetic, task-agnostic chat corpus that gives the embedded base model general skills.

A real instruct model arrives knowing the chat format, how to call *a* tool with JSON arguments
and how to copy strings exactly; it knows nothing of our environment. This corpus gives the tiny
default the same starting point, so the prompt-only baseline stays honest and SFT has something
to build on (STACK.md: from random weights SFT never learned to copy unseen ids, ~5%).

Every conversation invents its own world: random entity kinds (`shipment`, `sensor`, ...), tool
names (`fetch_shipment`, `lookup_sensor_by_email`, ...), argument names, id formats (`X-48213`,
`KQ_0093`), emails, decimals, dates and enum values. What it teaches:

- (a) copying ids, numbers, emails and enum values from the user's text into tool arguments,
  under the argument name the schema gives;
- (b) copying values *out of a tool response* into the next call's arguments and into the final
  answer (the skill STACK.md found missing: ~0% on 2-step tasks without it);
- (c) chains of 2-4 calls, parallel calls in one turn, tool errors, and answering without tools
  (small talk, facts given in the system prompt) when the question needs none;
- (d) ending every assistant turn with `<|im_end|>` (the chat template puts it in the loss).
- (e) copy drills (`ep_copy_drill`, `ep_echo`): short conversations that are mostly copying;
  pre-training starts with them, because the copy circuit only forms after ~1,000 steps of
  dense copying (measured on this model: 0% id copying without them, 92% with them).

It must never contain the environment's tools or tasks: the entity vocabulary leaves out the
support desk's nouns (customer, order, product) and `tests/integration/test_base_model.py`
asserts that no tool name and no task goal is shared with `SupportDesk`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Conversation = dict[str, Any]  # {"messages": [...OpenAI messages...], "tools": [...schemas...]}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ENTITY_NOUNS = _words(
    "record item ticket shipment invoice device sensor booking flight room package employee "
    "asset contract vehicle station project document account parcel course student member "
    "supplier warehouse recipe album book lease claim job server team event venue payment "
    "subscription license machine route trip hotel repair report loan meter crate pallet "
    "batch sample plant patient vendor contact tenant unit cargo permit badge locker "
    "container"
)
LOOKUP_VERBS = _words(
    "get fetch lookup retrieve read load query show describe inspect resolve pull view check"
)
FIND_VERBS = _words("find search locate match lookup resolve")
LIST_VERBS = _words("list enumerate browse get_all fetch_all")
SET_VERBS = _words("set update change modify assign edit")
TRANSFORM_VERBS = _words("estimate compute apply project adjust quote derive")
TRANSFORM_NOUNS = _words(
    "fee tax discount shipping_cost interest tip duty penalty bonus deposit surcharge "
    "refund_estimate"
)
FIRST_NAMES = _words(
    "amir bea carlos dina emil freya goran hiro ines jonas kira lars maya nils olga pavel "
    "quinn rosa sami tara umar vera wen xena yusuf zoe aiko bruno cleo dev"
)
LAST_NAMES = _words(
    "adler brandt costa duarte eriksen fischer garcia horvat ito jensen kowalski lopez moreau "
    "nakamura olsen patel quist reyes sato tanaka usman vogel wagner yilmaz zhang"
)
DOMAINS = _words(
    "example.org mail.test corp.example inbox.dev example.net post.io apex.test lab.example "
    "example.com home.test"
)
CITIES = _words(
    "Lisbon Oslo Nairobi Lima Osaka Tallinn Porto Quito Dakar Hanoi Perth Bergen Cusco Leeds "
    "Turin Gdansk Austin Kyoto"
)
CODES = _words("USD EUR GBP JPY CHF SEK NOK AUD CAD INR BRL ZAR")
ENUMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "status": (
        ("active", "inactive", "suspended"),
        ("open", "closed", "in_progress", "on_hold"),
        ("scheduled", "completed", "cancelled", "delayed"),
        ("approved", "rejected", "under_review"),
        ("in_transit", "arrived", "lost", "returned"),
        ("draft", "published", "archived"),
    ),
    "priority": (("low", "medium", "high", "urgent"),),
    "color": (("red", "blue", "green", "black", "white", "orange"),),
    "category": (("tools", "garden", "music", "sports", "office", "kitchen", "travel"),),
    "size": (("small", "medium", "large", "xl"),),
    "level": (("basic", "plus", "premium", "enterprise"),),
    "zone": (("north", "south", "east", "west", "central"),),
}
# field name -> value kind
FIELDS = {
    "status": "enum",
    "priority": "enum",
    "color": "enum",
    "category": "enum",
    "size": "enum",
    "level": "enum",
    "zone": "enum",
    "city": "city",
    "owner": "person",
    "contact_email": "email",
    "amount": "decimal",
    "balance": "decimal",
    "price": "decimal",
    "weight_kg": "decimal",
    "cost": "decimal",
    "score": "decimal",
    "quantity": "int",
    "capacity": "int",
    "count": "int",
    "created": "date",
    "due_date": "date",
    "updated": "date",
    "currency": "code",
    "serial": "code_id",
    "label": "label",
}
LABEL_ADJ = _words("Swift Quiet Bright Northern Golden Silver Rapid Hidden Royal")
LABEL_NOUN = _words("Falcon Harbor Maple Orbit Canyon Meadow Comet Summit Delta")
SYSTEM_ORGS = (
    "a logistics company",
    "a city library",
    "a hotel chain",
    "a bike rental shop",
    "a research lab",
    "an IT help desk",
    "a music school",
    "a property manager",
    "a clinic",
    "a travel agency",
    "a warehouse",
    "a film archive",
)
FACT_SUBJECTS = (
    "check-in time",
    "late fee",
    "pet fee",
    "max guests",
    "parking fee",
    "opening hour",
    "closing hour",
    "deposit",
    "minimum age",
    "wifi password",
    "loan period",
    "trial length",
    "office floor",
    "help line",
)


# ---------------------------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------------------------
def random_id(rng: random.Random, prefix: str, digits: int, sep: str) -> str:
    return f"{prefix}{sep}{rng.randrange(10**digits):0{digits}d}"


def random_email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    local = rng.choice((f"{first}.{last}", f"{first}{rng.randint(1, 999)}", f"{first[0]}{last}"))
    if rng.random() < 0.5:
        local += str(rng.randint(1, 99))
    return f"{local}@{rng.choice(DOMAINS)}"


def random_person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES).title()} {rng.choice(LAST_NAMES).title()}"


def random_decimal(rng: random.Random) -> float:
    return round(rng.uniform(0.5, 2000.0) if rng.random() < 0.8 else rng.uniform(1, 60), 2)


def random_date(rng: random.Random) -> str:
    return f"20{rng.randint(19, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


@dataclass(frozen=True)
class Kind:
    """An entity kind invented for one conversation: `shipment` with ids like `SH-04821`."""

    noun: str
    prefix: str
    digits: int
    sep: str
    id_arg: str
    fields: tuple[str, ...]
    enums: dict[str, tuple[str, ...]]

    def new_id(self, rng: random.Random) -> str:
        return random_id(rng, self.prefix, self.digits, self.sep)

    def value(self, rng: random.Random, field: str) -> Any:
        kind = FIELDS[field]
        makers: dict[str, Callable[[], Any]] = {
            "enum": lambda: rng.choice(self.enums[field]),
            "city": lambda: rng.choice(CITIES),
            "person": lambda: random_person(rng),
            "email": lambda: random_email(rng),
            "decimal": lambda: random_decimal(rng),
            "int": lambda: rng.randint(1, 500),
            "date": lambda: random_date(rng),
            "code": lambda: rng.choice(CODES),
            "code_id": lambda: random_id(rng, _prefix(rng), rng.randint(4, 7), ""),
            "label": lambda: f"{rng.choice(LABEL_ADJ)} {rng.choice(LABEL_NOUN)}",
        }
        return makers[kind]()

    def record(self, rng: random.Random, entity_id: str | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = {self.id_arg: entity_id or self.new_id(rng)}
        for field in self.fields:
            rec[field] = self.value(rng, field)
        return rec


def _prefix(rng: random.Random) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(rng.choice(letters) for _ in range(rng.choice((1, 1, 2, 2, 3))))


def random_kind(rng: random.Random, exclude: set[str] | None = None) -> Kind:
    noun = rng.choice([n for n in ENTITY_NOUNS if n not in (exclude or set())])
    fields = tuple(rng.sample(sorted(FIELDS), rng.randint(2, 5)))
    enums = {f: rng.choice(ENUMS[f]) for f in fields if FIELDS[f] == "enum"}
    id_arg = rng.choice((f"{noun}_id", f"{noun}_id", f"{noun}_id", "id", f"{noun}_ref", "key"))
    return Kind(
        noun=noun,
        prefix=_prefix(rng),
        digits=rng.randint(3, 6),
        sep=rng.choice(("-", "-", "-", "_", "")),
        id_arg=id_arg,
        fields=fields,
        enums=enums,
    )


def distinct_kinds(rng: random.Random, n: int, taken: set[str]) -> list[Kind]:
    """`n` kinds with nouns not in `taken` (which is updated): one tool family per noun."""
    kinds: list[Kind] = []
    for _ in range(n):
        kind = random_kind(rng, exclude=taken)
        taken.add(kind.noun)
        kinds.append(kind)
    return kinds


# ---------------------------------------------------------------------------------------------
# Tool schemas (OpenAI function format, as environments give them)
# ---------------------------------------------------------------------------------------------
def prop_schema(kind: Kind | None, field: str) -> dict[str, Any]:
    if kind is not None and FIELDS.get(field) == "enum":
        return {"type": "string", "enum": list(kind.enums[field])}
    if FIELDS.get(field) == "decimal":
        return {"type": "number"}
    if FIELDS.get(field) == "int":
        return {"type": "integer"}
    return {"type": "string"}


def tool_schema(
    name: str, description: str, props: dict[str, dict[str, Any]], rng: random.Random
) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object", "properties": props, "required": list(props)}
    if rng.random() < 0.5:
        params["additionalProperties"] = False
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": params},
    }


def get_tool(kind: Kind, rng: random.Random) -> dict[str, Any]:
    name = f"{rng.choice(LOOKUP_VERBS)}_{kind.noun}"
    desc = rng.choice(
        (
            f"Get a {kind.noun} by id.",
            f"Look up one {kind.noun}.",
            f"Fetch a {kind.noun} record by its id.",
        )
    )
    return tool_schema(name, desc, {kind.id_arg: {"type": "string"}}, rng)


def find_tool(kind: Kind, key: str, rng: random.Random) -> dict[str, Any]:
    name = f"{rng.choice(FIND_VERBS)}_{kind.noun}_by_{key}"
    desc = f"Find a {kind.noun} by {key.replace('_', ' ')}."
    return tool_schema(name, desc, {key: {"type": "string"}}, rng)


def list_tool(parent: Kind, child: Kind, rng: random.Random) -> dict[str, Any]:
    name = f"{rng.choice(LIST_VERBS)}_{child.noun}s"
    desc = f"List the {child.noun}s of a {parent.noun}."
    return tool_schema(name, desc, {parent.id_arg: {"type": "string"}}, rng)


def set_tool(kind: Kind, field: str, rng: random.Random) -> dict[str, Any]:
    name = rng.choice(
        (f"{rng.choice(SET_VERBS)}_{kind.noun}_{field}", f"{rng.choice(SET_VERBS)}_{kind.noun}")
    )
    desc = f"Set the {field.replace('_', ' ')} of a {kind.noun}."
    props = {kind.id_arg: {"type": "string"}, field: prop_schema(kind, field)}
    return tool_schema(name, desc, props, rng)


def distractor_tools(rng: random.Random, n: int, taken: set[str]) -> list[dict[str, Any]]:
    """Tools the conversation does not need, over nouns it does not use: choosing is a skill."""
    tools: list[dict[str, Any]] = []
    for (kind,) in (distinct_kinds(rng, 1, taken) for _ in range(n)):
        if rng.random() < 0.7:
            tools.append(get_tool(kind, rng))
        else:
            tools.append(set_tool(kind, rng.choice(kind.fields), rng))
    return tools


def name_of(tool: dict[str, Any]) -> str:
    return str(tool["function"]["name"])


# Building blocks of conversations
# ---------------------------------------------------------------------------------------------
class Builder:
    """One conversation under construction: its messages, tools, facts and nouns in use.

    Episodes (one user request each) append to the same builder, so a conversation can hold
    several requests over one tool set: more learned tokens per (expensive) tool listing, and
    practice at taking values from the *latest* request rather than an earlier one.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.messages: list[dict[str, Any]] = []
        self.tools: list[dict[str, Any]] = []
        self.nouns: set[str] = set()
        self.facts: dict[str, str] = {}
        self.n_calls = 0

    def offer(self, *tools: dict[str, Any]) -> None:
        known = {name_of(t) for t in self.tools}
        self.tools.extend(t for t in tools if name_of(t) not in known)

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def calls(self, calls: list[tuple[str, dict[str, Any]]], results: list[Any]) -> None:
        """One assistant turn with these calls, then one tool message per call."""
        ids = [f"call_{self.n_calls + i}" for i in range(len(calls))]
        self.n_calls += len(calls)
        tool_calls = [
            {
                "id": cid,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for cid, (name, args) in zip(ids, calls, strict=True)
        ]
        self.messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
        for cid, result in zip(ids, results, strict=True):
            self.messages.append(
                {"role": "tool", "tool_call_id": cid, "content": dump(result, self.rng)}
            )

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def dump(result: Any, rng: random.Random) -> str:
    """Tool results as environments print them: JSON, usually with sorted keys."""
    return json.dumps(result, ensure_ascii=False, sort_keys=rng.random() < 0.8)


def human(field: str) -> str:
    return field.replace("_", " ")


def show(value: Any) -> str:
    """A value in text exactly as the tool result wrote it (JSON's 129.5, not 129.50)."""
    return json.dumps(value) if isinstance(value, float) else str(value)


def system_prompt(rng: random.Random, facts: dict[str, str]) -> str:
    org = rng.choice(SYSTEM_ORGS)
    base = rng.choice(
        (
            f"You are the assistant of {org}. Use the tools to answer.",
            f"You help the staff of {org}. Call tools when you need data, then answer briefly.",
            "You are a helpful assistant with tools.",
            f"You are an operations assistant for {org}. Be concise.",
            f"Assistant for {org}. If a record does not exist, say so. Answer in one sentence.",
        )
    )
    if facts:
        base += " Facts: " + "; ".join(f"{k}: {v}" for k, v in facts.items()) + "."
    return base


def ask_field(rng: random.Random, noun: str, entity_id: str, field: str) -> str:
    f = human(field)
    return rng.choice(
        (
            f"What is the {f} of {noun} {entity_id}?",
            f"Can you tell me the {f} for {noun} {entity_id}?",
            f"{f.capitalize()} of {noun} {entity_id}?",
            f"I need the {f} of {noun} {entity_id}.",
            f"Look up {noun} {entity_id} and tell me its {f}.",
            f"Hi, which {f} does {noun} {entity_id} have?",
            f"{entity_id}: what {f} is that {noun}?",
        )
    )


def say_field(rng: random.Random, noun: str, entity_id: str, field: str, value: Any) -> str:
    f, v = human(field), show(value)
    return rng.choice(
        (
            f"The {f} of {noun} {entity_id} is {v}.",
            f"{noun.capitalize()} {entity_id} has {f} {v}.",
            f"{noun.capitalize()} {entity_id}: {f} is {v}.",
            f"It is {v}.",
        )
    )


# ---------------------------------------------------------------------------------------------
# Episodes: one user request each, appended to a Builder
# ---------------------------------------------------------------------------------------------
def ep_lookup(rng: random.Random, b: Builder) -> None:
    """(a) copy an id from the user text into a call; (b) copy a field into the answer."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    tool = get_tool(kind, rng)
    rec = kind.record(rng)
    field = rng.choice(kind.fields)
    b.offer(tool)
    b.user(ask_field(rng, kind.noun, rec[kind.id_arg], field))
    b.calls([(name_of(tool), {kind.id_arg: rec[kind.id_arg]})], [rec])
    b.answer(say_field(rng, kind.noun, rec[kind.id_arg], field, rec[field]))


def ep_find_by_key(rng: random.Random, b: Builder) -> None:
    """Find by email / label / serial, copying the key from the user text."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    key = rng.choice(("email", "email", "contact_email", "serial", "label"))
    key_value = random_email(rng) if key == "email" else kind.value(rng, key)
    tool = find_tool(kind, key, rng)
    rec = kind.record(rng)
    rec[key] = key_value
    field = rng.choice(kind.fields)
    b.offer(tool)
    if "email" in key:
        b.user(
            rng.choice(
                (
                    f"I'm {key_value}. What is the {human(field)} of my {kind.noun}?",
                    f"My email is {key_value}; which {human(field)} does my {kind.noun} have?",
                )
            )
        )
    else:
        b.user(f"What is the {human(field)} of the {kind.noun} with {human(key)} {key_value}?")
    b.calls([(name_of(tool), {key: key_value})], [rec])
    b.answer(say_field(rng, kind.noun, rec[kind.id_arg], field, rec[field]))


def ep_chain(rng: random.Random, b: Builder) -> None:
    """(b)+(c) follow references through 2-4 tools: each call copies an id from the last result."""
    depth = rng.choice((2, 2, 3, 4))
    kinds = distinct_kinds(rng, depth, b.nouns)
    tools = [get_tool(k, rng) for k in kinds]
    ids = [k.new_id(rng) for k in kinds]
    records = []
    for i, kind in enumerate(kinds):
        rec = kind.record(rng, ids[i])
        if i + 1 < depth:  # the reference is named after the next kind, whatever its id_arg
            rec[f"{kinds[i + 1].noun}_id"] = ids[i + 1]
        records.append(rec)
    field = rng.choice(kinds[-1].fields)
    path = " of the ".join(k.noun for k in reversed(kinds[1:]))
    b.offer(*tools)
    b.user(
        rng.choice(
            (
                f"What is the {human(field)} of the {path} of {kinds[0].noun} {ids[0]}?",
                f"For {kinds[0].noun} {ids[0]}, find the {path} and tell me its {human(field)}.",
            )
        )
    )
    for kind, tool, entity_id, rec in zip(kinds, tools, ids, records, strict=True):
        b.calls([(name_of(tool), {kind.id_arg: entity_id})], [rec])
    b.answer(say_field(rng, kinds[-1].noun, ids[-1], field, records[-1][field]))


def ep_list_pick(rng: random.Random, b: Builder) -> None:
    """Find a parent by email, list its children, pick the latest / first / largest one."""
    parent, child = distinct_kinds(rng, 2, b.nouns)
    email = random_email(rng)
    find = find_tool(parent, "email", rng)
    lister = list_tool(parent, child, rng)
    parent_id = parent.new_id(rng)
    statuses = rng.choice(ENUMS["status"])
    children = sorted(
        (
            {
                child.id_arg: child.new_id(rng),
                "created": random_date(rng),
                "amount": random_decimal(rng),
                "status": rng.choice(statuses),
            }
            for _ in range(rng.randint(1, 4))
        ),
        key=lambda r: str(r["created"]),
    )
    how = rng.choice(("latest", "first", "largest"))
    amounts = [float(str(r["amount"])) for r in children]
    pick = {"latest": children[-1], "first": children[0]}.get(how) or children[
        amounts.index(max(amounts))
    ]
    field = rng.choice(("status", "amount", "created"))
    b.offer(find, lister)
    b.user(f"I'm {email}. What is the {human(field)} of my {how} {child.noun}?")
    b.calls(
        [(name_of(find), {"email": email})],
        [{parent.id_arg: parent_id, "name": random_person(rng)}],
    )
    b.calls(
        [(name_of(lister), {parent.id_arg: parent_id})],
        [{parent.id_arg: parent_id, f"{child.noun}s": children}],
    )
    pid, value = pick[child.id_arg], show(pick[field])
    b.answer(
        rng.choice(
            (
                f"Your {how} {child.noun} {pid} has {human(field)} {value}.",
                f"The {human(field)} of {child.noun} {pid} is {value}.",
            )
        )
    )


def ep_numeric_pipe(rng: random.Random, b: Builder) -> None:
    """(b) pass a decimal from one result into the next call, with a code from the user text."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    value_field = rng.choice(("amount", "balance", "price", "cost", "weight_kg"))
    getter = get_tool(kind, rng)
    qty = rng.choice(TRANSFORM_NOUNS)
    code_arg = rng.choice(("code", "region", "plan", "rate_code", "unit"))
    code = rng.choice(CODES) if code_arg == "code" else random_id(rng, _prefix(rng), 2, "")
    transformer = tool_schema(
        f"{rng.choice(TRANSFORM_VERBS)}_{qty}",
        f"Compute the {human(qty)} for an amount.",
        {"amount": {"type": "number"}, code_arg: {"type": "string"}},
        rng,
    )
    rec = kind.record(rng)
    rec[value_field] = random_decimal(rng)
    out = round(rec[value_field] * rng.uniform(0.01, 1.5), 2)
    b.offer(getter, transformer)
    b.user(
        f"What is the {human(qty)} on the {human(value_field)} of {kind.noun} "
        f"{rec[kind.id_arg]} with {human(code_arg)} {code}?"
    )
    b.calls([(name_of(getter), {kind.id_arg: rec[kind.id_arg]})], [rec])
    b.calls(
        [(name_of(transformer), {"amount": rec[value_field], code_arg: code})],
        [{qty: out, code_arg: code}],
    )
    b.answer(
        rng.choice(
            (
                f"The {human(qty)} is {show(out)} ({code}).",
                f"{show(out)} {code} is the {human(qty)} for {kind.noun} {rec[kind.id_arg]}.",
            )
        )
    )


def ep_action(rng: random.Random, b: Builder) -> None:
    """(a) copy an id and a value (enum, number, email) from the user text into a write call."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    field = rng.choice(kind.fields)
    setter = set_tool(kind, field, rng)
    rec = kind.record(rng)
    eid, new = rec[kind.id_arg], kind.value(rng, field)
    b.offer(setter)
    b.user(
        rng.choice(
            (
                f"Please set the {human(field)} of {kind.noun} {eid} to {show(new)}.",
                f"Change {kind.noun} {eid}: {human(field)} should be {show(new)}.",
                f"Update the {human(field)} for {kind.noun} {eid} to {show(new)}, thanks.",
            )
        )
    )
    result = {kind.id_arg: eid, f"old_{field}": rec[field], field: new}
    b.calls([(name_of(setter), {kind.id_arg: eid, field: new})], [result])
    b.answer(
        rng.choice(
            (
                f"Done: {kind.noun} {eid} now has {human(field)} {show(new)}.",
                f"{kind.noun.capitalize()} {eid} has been updated to {show(new)}.",
            )
        )
    )


def ep_parallel(rng: random.Random, b: Builder) -> None:
    """Two lookups in one turn; both results come back in one grouped user turn."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    tool = get_tool(kind, rng)
    recs = [kind.record(rng), kind.record(rng)]
    field = rng.choice(kind.fields)
    a, c = recs[0][kind.id_arg], recs[1][kind.id_arg]
    b.offer(tool)
    b.user(f"What is the {human(field)} of {kind.noun}s {a} and {c}?")
    b.calls([(name_of(tool), {kind.id_arg: a}), (name_of(tool), {kind.id_arg: c})], recs)
    b.answer(
        f"{kind.noun.capitalize()} {a}: {show(recs[0][field])}; "
        f"{kind.noun} {c}: {show(recs[1][field])}."
    )


def ep_not_found(rng: random.Random, b: Builder) -> None:
    """A tool error: report it instead of inventing an answer."""
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    tool = get_tool(kind, rng)
    missing = kind.new_id(rng)
    field = rng.choice(kind.fields)
    b.offer(tool)
    b.user(ask_field(rng, kind.noun, missing, field))
    error = rng.choice((f"{kind.noun} {missing} not found", f"no {kind.noun} with id {missing}"))
    b.calls([(name_of(tool), {kind.id_arg: missing})], [{"error": error}])
    b.answer(
        rng.choice(
            (
                f"{kind.noun.capitalize()} {missing} was not found.",
                f"I could not find {kind.noun} {missing}: it was not found.",
            )
        )
    )


def ep_copy_drill(rng: random.Random, b: Builder) -> None:
    """Dense copying: the user spells out a call's values; the answer quotes the result.

    Short and mostly copy tokens, so the copy mechanism (induction over digit-by-digit ids)
    gets many examples per second of CPU; the richer episodes above then use it.
    """
    (kind,) = distinct_kinds(rng, 1, b.nouns)
    keys = [kind.id_arg, *rng.sample(["email", "amount", "code", "ref", "label", "owner"], 2)]
    keys = keys[: rng.randint(1, 3)]
    makers = {
        "email": lambda: random_email(rng),
        "amount": lambda: random_decimal(rng),
        "code": lambda: rng.choice(CODES),
        "ref": lambda: random_id(rng, _prefix(rng), rng.randint(3, 6), rng.choice(("-", ""))),
        "label": lambda: f"{rng.choice(LABEL_ADJ)} {rng.choice(LABEL_NOUN)}",
        "owner": lambda: random_person(rng),
    }
    args = {k: makers[k]() if k in makers else kind.new_id(rng) for k in keys}
    name = f"{rng.choice(LOOKUP_VERBS + SET_VERBS)}_{kind.noun}"
    props = {k: {"type": "number"} if k == "amount" else {"type": "string"} for k in args}
    b.offer(tool_schema(name, f"Run {human(name)}.", props, rng))
    sep = rng.choice((" ", ": ", "="))
    say = human if rng.random() < 0.5 else str
    spelled = ", ".join(f"{say(k)}{sep}{show(v)}" for k, v in args.items())
    b.user(rng.choice((f"Call {name} with {spelled}.", f"Use {name} for {spelled}, please.",
                       f"{spelled}: run {name}.")))  # fmt: skip
    field = rng.choice(("result", "value", "token", "answer", "match"))
    value = rng.choice((kind.new_id(rng), random_email(rng), random_decimal(rng)))
    b.calls([(name, args)], [{field: value, **dict(list(args.items())[:1])}])
    b.answer(rng.choice((f"The {field} is {show(value)}.", f"{show(value)}")))


def ep_echo(rng: random.Random, b: Builder) -> None:
    """Pure copying: repeat a few random values exactly (the induction drill).

    Measured: a 2-layer model needs ~1,000 steps of dense copying before it copies digit-by-
    digit ids at all (before that it writes plausible ids of its own); the same steps spent on
    full conversations taught format and tool choice but no copying.
    """
    values = [
        rng.choice(
            (
                random_id(rng, _prefix(rng), rng.randint(3, 6), rng.choice(("-", "_", ""))),
                random_email(rng),
                json.dumps(random_decimal(rng)),
                f"{rng.choice(LABEL_ADJ)} {rng.choice(LABEL_NOUN)}",
            )
        )
        for _ in range(rng.randint(1, 4))
    ]
    joined = rng.choice((" ", ", ", "; ")).join(values)
    b.user(rng.choice((f"Repeat exactly: {joined}", f"Copy these values: {joined}",
                       f"Please echo {joined}")))  # fmt: skip
    b.answer(joined)


def ep_no_tool(rng: random.Random, b: Builder) -> None:
    """(c) answer without tools: facts from the system prompt, small talk, echoing a code."""
    style = rng.choice(("fact", "fact", "chat", "echo"))
    if style == "fact":
        if not b.facts:
            subjects = rng.sample(FACT_SUBJECTS, rng.randint(2, 5))
            b.facts.update({s: _fact_value(rng) for s in subjects})
        subject = rng.choice(sorted(b.facts))
        b.user(
            rng.choice(
                (
                    f"What is the {subject}?",
                    f"Quick question: {subject}?",
                    f"Can you remind me of the {subject}?",
                )
            )
        )
        b.answer(f"The {subject} is {b.facts[subject]}.")
    elif style == "chat":
        q, a = rng.choice(
            (
                ("Hello!", "Hello! How can I help you today?"),
                ("Thanks a lot.", "You're welcome!"),
                ("Who are you?", "I am an assistant that can use tools to look things up."),
                ("Can you help me?", "Yes. Tell me what you need."),
                ("Good morning", "Good morning! What can I do for you?"),
            )
        )
        b.user(q)
        b.answer(a)
    else:
        code = random_id(rng, _prefix(rng), rng.randint(3, 6), rng.choice(("-", "")))
        b.user(rng.choice((f"Please repeat this code back to me: {code}", f"Say {code} back.")))
        b.answer(rng.choice((code, f"The code is {code}.")))


def _fact_value(rng: random.Random) -> str:
    return rng.choice(
        (
            f"{rng.randint(1, 23):02d}:{rng.choice(('00', '30', '15'))}",
            f"{show(random_decimal(rng))} {rng.choice(CODES)}",
            f"{rng.randint(1, 60)} days",
            f"{rng.randint(2, 12)} people",
            f"floor {rng.randint(1, 40)}",
            random_id(rng, _prefix(rng), 4, "-"),
        )
    )


Episode = Callable[[random.Random, Builder], None]
EPISODES: dict[str, tuple[Episode, float]] = {
    "lookup": (ep_lookup, 0.22),
    "find_by_key": (ep_find_by_key, 0.10),
    "chain": (ep_chain, 0.18),
    "list_pick": (ep_list_pick, 0.08),
    "numeric_pipe": (ep_numeric_pipe, 0.10),
    "action": (ep_action, 0.10),
    "parallel": (ep_parallel, 0.05),
    "not_found": (ep_not_found, 0.07),
    "no_tool": (ep_no_tool, 0.10),
    "copy_drill": (ep_copy_drill, 0.0),  # drawn only for drill conversations
    "echo": (ep_echo, 0.0),
}
MAX_TOOLS = 8  # like the environments we serve: a handful of tools in the prompt
DRILL_RATE = 0.3  # conversations that are copy drills only (short, no distractor tools)
DRILLS = {"copy_drill", "echo"}


def generate_conversation(
    rng: random.Random, episodes: Sequence[str] | None = None
) -> Conversation:
    """System prompt, 1-3 requests over one tool set, and a few distractor tools.

    `episodes` fixes the requests (names of `EPISODES`) instead of drawing them.
    """
    b = Builder(rng)
    drill = episodes is None and rng.random() < DRILL_RATE
    if drill:
        episodes = rng.choices(("copy_drill", "echo"), k=rng.randint(2, 5))
    elif episodes is None:
        names = list(EPISODES)
        weights = [EPISODES[n][1] for n in names]
        # several requests share one (token-expensive) tool listing: more learning per token
        k = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
        episodes = rng.choices(names, weights=weights, k=k)
    if rng.random() < 0.25:  # facts in the system prompt that no request asks about
        b.facts.update({s: _fact_value(rng) for s in rng.sample(FACT_SUBJECTS, 2)})
    for name in episodes:
        EPISODES[name][0](rng, b)
    room = max(0, MAX_TOOLS - len(b.tools))
    most = 0 if drill else min(room, 6 if rng.random() < 0.2 else 2)  # sometimes a long list
    least = 0 if b.tools or drill else 1
    tools = b.tools + distractor_tools(rng, rng.randint(least, most), b.nouns)
    rng.shuffle(tools)
    messages = [{"role": "system", "content": system_prompt(rng, b.facts)}, *b.messages]
    return {"messages": messages, "tools": tools, "episodes": list(episodes)}


def is_drill(conv: Conversation) -> bool:
    """A conversation made only of copy drills (pre-training starts with these)."""
    return set(conv["episodes"]) <= DRILLS


def generate_corpus(n: int, seed: int) -> list[Conversation]:
    """`n` conversations, deterministic for `seed`."""
    rng = random.Random(seed)
    return [generate_conversation(rng) for _ in range(n)]


def corpus_tool_names(corpus: list[Conversation]) -> set[str]:
    """Every tool name offered or called anywhere in the corpus."""
    names = {name_of(t) for conv in corpus for t in conv["tools"]}
    for conv in corpus:
        for msg in conv["messages"]:
            for call in msg.get("tool_calls") or ():
                names.add(call["function"]["name"])
    return names
