"""The built-in environment: a customer-operations desk over a seeded SQLite database.

Tools really execute SQL against a per-episode copy of the database, so write tasks (cancel,
refund) are verified from the final database state and read tasks from the final answer; no
reference trajectory is ever compared. Everything derives from `db_seed`, so the world, the
tasks and the verdicts are reproducible on any machine.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from tracetune.environments.base import (
    STANDALONE_NUMBER,
    AskUser,
    Call,
    Environment,
    EpisodeRecord,
    Grounded,
    Outcome,
    Solver,
    Task,
    Tool,
    ToolError,
)
from tracetune.environments.safe_math import MathError, evaluate

STATUSES = ("pending", "shipped", "delivered", "cancelled", "refunded")
TIERS = ("bronze", "silver", "gold")
RATES_PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CAD": 1.36, "JPY": 151.2}
EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
NOT_FOUND = "not found"

POLICIES: dict[str, tuple[tuple[str, ...], str]] = {
    "returns": (
        ("How long do I have to return an item?", "What is your return window?"),
        "30 days",
    ),
    "shipping": (
        ("How long does standard shipping take?", "When will standard shipping arrive?"),
        "5 business days",
    ),
    "hours": (("When is support open?", "What are your support hours?"), "9:00-17:00 UTC"),
    "free_shipping": (
        ("Is there free shipping?", "From what amount is shipping free?"),
        "over 50 USD",
    ),
    "warranty": (("How long is the warranty?", "What warranty do products have?"), "2 years"),
}

SYSTEM_PROMPT = (
    "You are the customer-operations assistant of Acme Store. Use the tools to look up "
    "customers, orders and products, to calculate and to convert currency. Policies: returns "
    "within 30 days; standard shipping takes 5 business days; support hours 9:00-17:00 UTC; "
    "free shipping over 50 USD; warranty 2 years. Only pending orders can be cancelled and only "
    "delivered orders refunded. Amounts have 2 decimals. If a record does not exist, say it was "
    "not found. End with one short answer sentence."
)

_ADJ = ("Blue", "Red", "Green", "Steel", "Smart", "Mini", "Classic", "Silent", "Travel", "Eco")
_NOUN = ("Kettle", "Lamp", "Backpack", "Mug", "Speaker", "Chair", "Blender", "Charger", "Desk")
_FIRST = ("ana", "ben", "chen", "dara", "eli", "fay", "gus", "hana", "ivo", "jun", "kai", "lea")
_LAST = ("smith", "ng", "okafor", "silva", "kim", "novak", "haas", "rossi", "diaz", "berg")
_COUNTRIES = ("US", "DE", "GB", "FR", "CA", "JP")


# ---------------------------------------------------------------------------------------------
# The world: built once per seed, copied per episode.
# ---------------------------------------------------------------------------------------------
def _build_rows(db_seed: int, n_customers: int, n_orders: int) -> dict[str, list[tuple[Any, ...]]]:
    rng = random.Random(db_seed)
    products = []
    for i, (adj, noun) in enumerate((a, n) for a in _ADJ for n in _NOUN):
        products.append((f"P-{101 + i}", f"{adj} {noun}", round(rng.uniform(5, 250), 2)))
    customers = []
    for i in range(n_customers):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        cid = f"C-{i + 1:04d}"
        email = f"{first}.{last}{i + 1}@example.com"
        tier = rng.choices(TIERS, weights=(5, 3, 2))[0]
        customers.append(
            (cid, f"{first.title()} {last.title()}", email, tier, rng.choice(_COUNTRIES))
        )
    orders, items = [], []
    start = datetime(2026, 1, 1)
    for i in range(n_orders):
        oid = f"O-{10001 + i}"
        cid = customers[rng.randrange(n_customers)][0]
        status = rng.choices(STATUSES, weights=(3, 3, 5, 1, 1))[0]
        created = (start + timedelta(days=rng.randrange(300), minutes=i)).isoformat()
        orders.append((oid, cid, status, created))
        for product in rng.sample(products, rng.randint(1, 3)):
            items.append((oid, product[0], rng.randint(1, 3), product[2]))
    return {"products": products, "customers": customers, "orders": orders, "items": items}


@lru_cache(maxsize=4)
def _template_db(db_seed: int, n_customers: int, n_orders: int) -> sqlite3.Connection:
    rows = _build_rows(db_seed, n_customers, n_orders)
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(
        """
        CREATE TABLE products (product_id TEXT PRIMARY KEY, name TEXT, price_usd REAL);
        CREATE TABLE customers (customer_id TEXT PRIMARY KEY, name TEXT, email TEXT UNIQUE,
                                tier TEXT, country TEXT);
        CREATE TABLE orders (order_id TEXT PRIMARY KEY, customer_id TEXT, status TEXT,
                             created TEXT);
        CREATE TABLE items (order_id TEXT, product_id TEXT, qty INTEGER, unit_price_usd REAL);
        CREATE INDEX items_order ON items(order_id);
        CREATE INDEX orders_customer ON orders(customer_id);
        """
    )
    for table, values in rows.items():
        marks = ",".join("?" * len(values[0]))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    conn.commit()
    return conn


def _money(value: float) -> float:
    return round(value + 1e-9, 2)


class SupportDesk(Environment):
    """Customer-operations desk: 8 tools, 12 task families from no-tool answers to 4-call chains,
    two of them multi-turn (a scripted user gives a missing order id, or a "yes" before a write)."""

    name = "support_desk"
    system_prompt = SYSTEM_PROMPT

    def __init__(
        self, max_steps: int = 15, db_seed: int = 1234, n_customers: int = 400, n_orders: int = 2000
    ) -> None:
        self.db_seed, self.n_customers, self.n_orders = db_seed, n_customers, n_orders
        self.db = sqlite3.connect(":memory:")
        super().__init__(max_steps=max_steps)

    # --- tools ------------------------------------------------------------------------------
    def _tools(self) -> Sequence[Tool]:
        s = {"type": "string"}
        n = {"type": "number"}

        def obj(props: dict[str, Any]) -> dict[str, Any]:
            return {
                "type": "object",
                "properties": props,
                "required": list(props),
                "additionalProperties": False,
            }

        cur = {"type": "string", "enum": sorted(RATES_PER_USD)}
        # What the agent can only copy: ids, emails and product names the user or a tool gave,
        # the currency the user asked for, an amount a tool returned (docs/environments.md).
        customer = {"customer_id": Grounded(r"\bC-\d+\b")}
        order = {"order_id": Grounded(r"\bO-\d+\b")}
        asked = Grounded(r"\b(?:" + "|".join(sorted(RATES_PER_USD)) + r")\b")
        return [
            Tool(
                "get_customer",
                "Get a customer by id.",
                obj({"customer_id": s}),
                self.get_customer,
                customer,
                read_only=True,
            ),
            Tool(
                "find_customer",
                "Find a customer by email.",
                obj({"email": s}),
                self.find_customer,
                {"email": Grounded(EMAIL_PATTERN)},
                read_only=True,
            ),
            Tool(
                "get_order",
                "Get an order with its items.",
                obj({"order_id": s}),
                self.get_order,
                order,
                read_only=True,
            ),
            Tool(
                "list_orders",
                "List a customer's orders, oldest first.",
                obj({"customer_id": s}),
                self.list_orders,
                customer,
                read_only=True,
            ),
            Tool(
                "search_products",
                "Search products by name.",
                obj({"query": s}),
                self.search_products,
                {"query": Grounded()},
                read_only=True,
            ),
            Tool(
                "calculate",
                "Evaluate + - * / arithmetic.",
                obj({"expression": s}),
                self.calculate,
                read_only=True,
            ),
            Tool(
                "convert_currency",
                "Convert an amount between currencies.",
                obj({"amount": n, "from_currency": cur, "to_currency": cur}),
                self.convert_currency,
                {"amount": Grounded(number=True), "to_currency": asked},
            ),
            Tool(
                "update_order_status",
                "Set an order's status to cancelled or refunded.",
                obj(
                    {"order_id": s, "status": {"type": "string", "enum": ["cancelled", "refunded"]}}
                ),
                self.update_order_status,
                order,
            ),
        ]

    def get_customer(self, customer_id: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT customer_id, name, email, tier, country FROM customers WHERE customer_id=?",
            (customer_id.strip(),),
        ).fetchone()
        if row is None:
            raise ToolError(f"customer {customer_id} {NOT_FOUND}")
        return dict(zip(("customer_id", "name", "email", "tier", "country"), row, strict=True))

    def find_customer(self, email: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT customer_id, name, tier FROM customers WHERE email=?", (email.strip().lower(),)
        ).fetchone()
        if row is None:
            raise ToolError(f"no customer with email {email}")
        return dict(zip(("customer_id", "name", "tier"), row, strict=True))

    def get_order(self, order_id: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT order_id, customer_id, status, created FROM orders WHERE order_id=?",
            (order_id.strip(),),
        ).fetchone()
        if row is None:
            raise ToolError(f"order {order_id} {NOT_FOUND}")
        items = self.db.execute(
            "SELECT i.product_id, p.name, i.qty, i.unit_price_usd FROM items i "
            "JOIN products p USING(product_id) WHERE order_id=? ORDER BY i.rowid",
            (row[0],),
        ).fetchall()
        return {
            "order_id": row[0],
            "customer_id": row[1],
            "status": row[2],
            "created": row[3][:10],
            "items": [{"product": it[1], "qty": it[2], "unit_price_usd": it[3]} for it in items],
            "total_usd": _money(sum(it[2] * it[3] for it in items)),
        }

    def list_orders(self, customer_id: str) -> dict[str, Any]:
        if (
            self.db.execute(
                "SELECT 1 FROM customers WHERE customer_id=?", (customer_id.strip(),)
            ).fetchone()
            is None
        ):
            raise ToolError(f"customer {customer_id} {NOT_FOUND}")
        rows = self.db.execute(
            "SELECT o.order_id, o.status, o.created, SUM(i.qty * i.unit_price_usd) FROM orders o "
            "JOIN items i USING(order_id) WHERE customer_id=? GROUP BY o.order_id ORDER BY created",
            (customer_id.strip(),),
        ).fetchall()
        orders = [
            {"order_id": r[0], "status": r[1], "created": r[2][:10], "total_usd": _money(r[3])}
            for r in rows
        ]
        return {"customer_id": customer_id.strip(), "orders": orders}

    def search_products(self, query: str) -> dict[str, Any]:
        rows = self.db.execute(
            "SELECT product_id, name, price_usd FROM products WHERE lower(name) LIKE ? "
            "ORDER BY name LIMIT 5",
            (f"%{query.strip().lower()}%",),
        ).fetchall()
        return {"results": [{"product_id": r[0], "name": r[1], "price_usd": r[2]} for r in rows]}

    def calculate(self, expression: str) -> dict[str, Any]:
        try:
            return {"result": _money(evaluate(expression))}
        except MathError as exc:
            raise ToolError(str(exc)) from exc

    def convert_currency(
        self, amount: float, from_currency: str, to_currency: str
    ) -> dict[str, Any]:
        usd = amount / RATES_PER_USD[from_currency]
        return {"amount": _money(usd * RATES_PER_USD[to_currency]), "currency": to_currency}

    def update_order_status(self, order_id: str, status: str) -> dict[str, Any]:
        order = self.get_order(order_id)
        needed = {"cancelled": "pending", "refunded": "delivered"}[status]
        if order["status"] != needed:
            raise ToolError(
                f"order {order_id} is {order['status']}; only {needed} orders can be {status}"
            )
        self.db.execute("UPDATE orders SET status=? WHERE order_id=?", (status, order["order_id"]))
        return {"order_id": order["order_id"], "old_status": needed, "status": status}

    # --- episodes ---------------------------------------------------------------------------
    def _reset(self, task: Task) -> None:
        self.db.close()
        self.db = sqlite3.connect(":memory:")
        self._template().backup(self.db)
        self.db.executescript(
            "CREATE TEMP TABLE touched (order_id TEXT);"
            "CREATE TEMP TRIGGER log_touch AFTER UPDATE ON main.orders "
            "BEGIN INSERT INTO touched VALUES (NEW.order_id); END;"
        )

    def _template(self) -> sqlite3.Connection:
        return _template_db(self.db_seed, self.n_customers, self.n_orders)

    def verify(self, final_answer: str | None) -> Outcome:
        if self.task is None:
            raise RuntimeError("verify() before reset()")
        check = self.task.check
        answer = (final_answer or "").strip()
        reasons: list[str] = []
        if not answer:
            reasons.append("no final answer")
        else:
            reasons += _check_answer(answer, check)
            if not reasons:
                reasons += _check_grounded(check, self.observations)
        reasons += _check_looked_up(check, self.observations)
        reasons += self._check_state(check)
        success = not reasons
        return Outcome(
            success=success,
            reward=1.0 if success else -1.0,
            details={"reasons": reasons, "calls": self.calls_made, "tool_errors": self.errors},
        )

    def verify_episode(self, episode: EpisodeRecord) -> Outcome:
        """`verify` on the final answer and state, plus what only the whole conversation shows:
        a write the task allows only after the user's "yes" must come after it, and an order
        only the user can name must have been named before it was looked up."""
        outcome = self.verify(episode.final_answer)
        check = self._check()
        late = _check_confirmed_first(check, episode.messages)
        late += _check_told_first(check, episode.messages)
        if not late:
            return outcome
        reasons = [*outcome.details.get("reasons", []), *late]
        return Outcome(False, -1.0, {**outcome.details, "reasons": reasons})

    @property
    def max_turns(self) -> int:
        """One more than the base: a multi-turn family's user replies once, so its agent
        spends one turn asking besides its calls and its answer."""
        return self.max_steps + 2

    def user_reply(self, messages: Sequence[dict[str, Any]]) -> str | None:
        """The task family's scripted user (`Family.user`); single-turn families have none."""
        if self.task is None:
            raise RuntimeError("user_reply() before reset()")
        family = FAMILIES.get(self.task.family)
        return family.user(self.task, messages) if family and family.user else None

    def _check(self) -> dict[str, Any]:
        if self.task is None:
            raise RuntimeError("verify before reset()")
        return self.task.check

    def _check_state(self, check: dict[str, Any]) -> list[str]:
        """Writes: the wanted change happened, and nothing else in `orders` changed.

        A temporary trigger (set up in `_reset`) lists every order touched in the episode, so
        the comparison with the pristine world reads a handful of rows, not the whole table.
        """
        want = dict(check.get("state", {}))
        reasons = []
        for oid, status in want.items():
            row = self.db.execute("SELECT status FROM orders WHERE order_id=?", (oid,)).fetchone()
            if row is None or row[0] != status:
                reasons.append(f"order {oid} should be {status}, is {row and row[0]}")
        touched = [r[0] for r in self.db.execute("SELECT DISTINCT order_id FROM temp.touched")]
        template = self._template()
        changed = []
        for oid in touched:
            now = self.db.execute("SELECT status FROM orders WHERE order_id=?", (oid,)).fetchone()
            was = template.execute("SELECT status FROM orders WHERE order_id=?", (oid,)).fetchone()
            if now != was and oid not in want:
                changed.append(oid)
        if changed:
            reasons.append(f"unexpected status change on {', '.join(sorted(changed))}")
        return reasons

    # --- tasks ------------------------------------------------------------------------------
    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        chosen = list(families or FAMILIES)
        unknown = set(chosen) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown task families: {sorted(unknown)}")
        rng = random.Random(seed)
        db = self._template()
        out: dict[str, Task] = {}
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct tasks from families {chosen}")
            family = FAMILIES[
                chosen[len(out) % len(chosen)] if attempts <= n else rng.choice(chosen)
            ]
            args = family.pick(db, rng)
            if args is not None and ":".join((family.name, *args)) not in out:
                task = family.build(db, args)
                out[task.id] = task
        return list(out.values())

    def task_by_id(self, task_id: str) -> Task:
        """Rebuild a task from its id (`family:arg:...`), e.g. a held-out task named in logs."""
        family, *args = task_id.split(":")
        if family not in FAMILIES:
            raise KeyError(f"unknown task family in id {task_id!r}")
        try:
            return FAMILIES[family].build(self._template(), tuple(args))
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise KeyError(f"task {task_id!r} does not exist in this world: {exc}") from None

    def families(self) -> list[str]:
        return list(FAMILIES)

    def oracle(self, task: Task) -> Solver | None:
        """The family's reference solver (None for a task of a family this desk does not know)."""
        family = FAMILIES.get(task.family)
        return family.solve(task) if family is not None else None


# ---------------------------------------------------------------------------------------------
# Answer checks: facts that must appear in the final answer.
# ---------------------------------------------------------------------------------------------
def numbers_in(text: str) -> list[float]:
    """Numbers standing alone in text (ids such as O-10423 or C-0042 are not numbers)."""
    return [float(m) for m in STANDALONE_NUMBER.findall(text.replace(",", ""))]


def _check_answer(answer: str, check: dict[str, Any]) -> list[str]:
    low = answer.lower()
    reasons = []
    if "word" in check:
        word, rivals = check["word"], check.get("rivals", ())
        if word not in low:
            reasons.append(f"answer lacks '{word}'")
        wrong = [r for r in rivals if r != word and re.search(rf"\b{r}\b", low)]
        if wrong:
            reasons.append(f"answer also claims {wrong}")
    if "phrase" in check and check["phrase"].lower() not in low:
        reasons.append(f"answer lacks '{check['phrase']}'")
    if "number" in check:
        found = numbers_in(answer)
        if not any(abs(x - check["number"]) <= 0.011 for x in found):
            reasons.append(f"answer lacks the amount {check['number']:.2f}")
        elif len(found) > 3:
            reasons.append("answer lists too many amounts")
    return reasons


def _check_grounded(check: dict[str, Any], observations: Sequence[str]) -> list[str]:
    """A fact the answer states must have come out of a tool in this episode.

    Why: a status or tier has a handful of possible values, so an agent that guesses without
    looking ("delivered") would otherwise pass a share of lookups it never made. Facts from the
    system prompt (`phrase` only: policy questions) need no tool.
    """
    if "word" in check:
        if not any(check["word"] in text.lower() for text in observations):
            return [f"'{check['word']}' was never returned by a tool (a guess)"]
    elif "number" in check:
        seen = (x for text in observations for x in numbers_in(text))
        if not any(abs(x - check["number"]) <= 0.011 for x in seen):
            return [f"the amount {check['number']:.2f} was never returned by a tool (a guess)"]
    return []


def _check_looked_up(check: dict[str, Any], observations: Sequence[str]) -> list[str]:
    """The order the user named must have been fetched: the answer is about *that* order (its
    id reaches the conversation only through the user's reply, so the agent had to ask)."""
    order_id = check.get("looked_up")
    if order_id is None:
        return []
    for text in observations:
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("order_id") == order_id:
            return []
    return [f"order {order_id} was never looked up"]


def _check_told_first(check: dict[str, Any], messages: Sequence[dict[str, Any]]) -> list[str]:
    """The order only the user can name (`looked_up`) is used in a call only after a user
    message named it: an id that reached a call any other way was guessed or made up."""
    order_id = check.get("looked_up")
    if order_id is None:
        return []
    named = re.compile(rf"\b{re.escape(order_id)}\b")
    told = False
    for message in messages[2:]:  # after the goal, which does not name it
        if message.get("role") == "user" and named.search(str(message.get("content") or "")):
            told = True
        for call in message.get("tool_calls") or ():
            if named.search(str((call.get("function") or {}).get("arguments"))) and not told:
                return [f"order {order_id} was used before the user gave it"]
    return []


def _check_confirmed_first(check: dict[str, Any], messages: Sequence[dict[str, Any]]) -> list[str]:
    """A call of the `confirm_before` tool (the write) must follow the user's explicit "yes".

    Judged from the conversation's order, not the final state: a write made before the user
    agreed fails even when the user agrees afterwards and the state ends up as wanted. Every
    call counts, a failed one too: trying to write without consent is the fault.
    """
    tool = check.get("confirm_before")
    if tool is None:
        return []
    confirmed = False
    for message in messages[1:]:
        if message.get("role") == "user" and message.get("content") == CONFIRM:
            confirmed = True
        for call in message.get("tool_calls") or ():
            if (call.get("function") or {}).get("name") == tool and not confirmed:
                return [f"{tool} was called before the user confirmed"]
    return []


# ---------------------------------------------------------------------------------------------
# Task families. A task id is `family:arg:arg...`; `build` turns those args back into the task
# (so evaluation can rebuild held-out tasks from ids in the logs), `pick` draws args at random,
# and `solve` is the family's oracle, which plays through the real tools.
# ---------------------------------------------------------------------------------------------
Args = tuple[str, ...]


UserScript = Callable[[Task, Sequence[dict[str, Any]]], str | None]


class Family:
    """`user`: the family's scripted user (`Environment.user_reply`); None: single-turn."""

    def __init__(
        self,
        name: str,
        pick: Callable[[sqlite3.Connection, random.Random], Args | None],
        build: Callable[[sqlite3.Connection, Args], tuple[str, dict[str, Any]]],
        solve: Callable[[Task], Solver],
        user: UserScript | None = None,
    ) -> None:
        self.name, self.pick, self._build, self.solve = name, pick, build, solve
        self.user = user

    def build(self, db: sqlite3.Connection, args: Args) -> Task:
        goal, check = self._build(db, args)
        return Task(":".join((self.name, *args)), self.name, goal, check, {"args": list(args)})


_ROWS: dict[tuple[int, str], list[tuple[Any, ...]]] = {}


def _pick(db: sqlite3.Connection, rng: random.Random, sql: str) -> tuple[Any, ...] | None:
    """A random row of `sql` over the (read-only) template world; candidate lists are cached."""
    key = (id(db), sql)
    if key not in _ROWS:
        _ROWS[key] = db.execute(sql).fetchall()
    rows = _ROWS[key]
    return rows[rng.randrange(len(rows))] if rows else None


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    row = db.execute(sql, args).fetchone()
    if row is None:
        raise KeyError(f"no row for {args}")
    return row[0]


def _arg(task: Task, i: int) -> str:
    return str(task.params["args"][i])


def _order_total(db: sqlite3.Connection, order_id: str) -> float:
    return _money(
        _one(db, "SELECT SUM(qty * unit_price_usd) FROM items WHERE order_id=?", order_id)
    )


def _convert(amount: float, to: str) -> float:
    return _money(amount * RATES_PER_USD[to])


# order_status -------------------------------------------------------------------------------
_STATUS_QUESTIONS = ("What is the status of order {o}?", "Where is my order {o}?", "Status of {o}?")


def _pick_order_status(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT order_id FROM orders")
    return (row[0], str(rng.randrange(len(_STATUS_QUESTIONS)))) if row else None


def _build_order_status(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    status = _one(db, "SELECT status FROM orders WHERE order_id=?", a[0])
    return _STATUS_QUESTIONS[int(a[1])].format(o=a[0]), {"word": status, "rivals": list(STATUSES)}


def _solve_order_status(task: Task) -> Solver:
    order = yield Call("get_order", {"order_id": _arg(task, 0)})
    return f"Order {order['order_id']} is {order['status']}."


# customer_tier ------------------------------------------------------------------------------
def _pick_customer_tier(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT customer_id FROM customers")
    return (row[0],) if row else None


def _build_customer_tier(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    tier = _one(db, "SELECT tier FROM customers WHERE customer_id=?", a[0])
    return f"Which loyalty tier is customer {a[0]} in?", {"word": tier, "rivals": list(TIERS)}


def _solve_customer_tier(task: Task) -> Solver:
    customer = yield Call("get_customer", {"customer_id": _arg(task, 0)})
    return f"Customer {customer['customer_id']} is in the {customer['tier']} tier."


# product_price ------------------------------------------------------------------------------
def _pick_product_price(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT name FROM products")
    return (row[0],) if row else None


def _build_product_price(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    price = _one(db, "SELECT price_usd FROM products WHERE name=?", a[0])
    return f"How much does the {a[0]} cost?", {"number": price}


def _solve_product_price(task: Task) -> Solver:
    found = yield Call("search_products", {"query": _arg(task, 0)})
    hit = next(r for r in found["results"] if r["name"] == _arg(task, 0))
    return f"The {hit['name']} costs {hit['price_usd']:.2f} USD."


# order_total_fx -----------------------------------------------------------------------------
def _pick_order_total_fx(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT order_id FROM orders")
    return (row[0], rng.choice(("EUR", "GBP", "CAD", "JPY"))) if row else None


def _build_order_total_fx(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    goal = f"What is the total of order {a[0]} in {a[1]}?"
    return goal, {"number": _convert(_order_total(db, a[0]), a[1])}


def _solve_order_total_fx(task: Task) -> Solver:
    order = yield Call("get_order", {"order_id": _arg(task, 0)})
    cur = _arg(task, 1)
    fx = yield Call(
        "convert_currency",
        {"amount": order["total_usd"], "from_currency": "USD", "to_currency": cur},
    )
    return f"The total of order {order['order_id']} is {fx['amount']:.2f} {cur}."


# latest_order_by_email ----------------------------------------------------------------------
_LATEST = (
    "SELECT o.order_id, o.status FROM orders o JOIN customers c USING(customer_id) "
    "WHERE c.email=? ORDER BY o.created DESC LIMIT 1"
)


def _pick_latest_order_by_email(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT DISTINCT c.email FROM customers c JOIN orders USING(customer_id)")
    return (row[0],) if row else None


def _build_latest_order_by_email(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    status = db.execute(_LATEST, (a[0],)).fetchone()[1]
    goal = f"I'm {a[0]}. What is the status of my latest order?"
    return goal, {"word": status, "rivals": list(STATUSES)}


def _solve_latest_order_by_email(task: Task) -> Solver:
    customer = yield Call("find_customer", {"email": _arg(task, 0)})
    listing = yield Call("list_orders", {"customer_id": customer["customer_id"]})
    latest = listing["orders"][-1]
    return f"Your latest order {latest['order_id']} is {latest['status']}."


# cancel_order (write) -----------------------------------------------------------------------
def _pick_cancel_order(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT order_id FROM orders WHERE status='pending'")
    return (row[0],) if row else None


def _build_cancel_order(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    return f"Please cancel order {a[0]}.", {"state": {a[0]: "cancelled"}, "word": "cancelled"}


def _solve_cancel_order(task: Task) -> Solver:
    done = yield Call("update_order_status", {"order_id": _arg(task, 0), "status": "cancelled"})
    return f"Order {done['order_id']} has been cancelled."


# missing_order (a tool error to handle) -----------------------------------------------------
def _pick_missing_order(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    oid = f"O-{rng.randint(60000, 99999)}"
    exists = db.execute("SELECT 1 FROM orders WHERE order_id=?", (oid,)).fetchone()
    return None if exists else (oid,)


def _build_missing_order(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    check = {"phrase": NOT_FOUND, "word": NOT_FOUND, "rivals": list(STATUSES)}
    return f"What is the status of order {a[0]}?", check


def _solve_missing_order(task: Task) -> Solver:
    result = yield Call("get_order", {"order_id": _arg(task, 0)})
    if "error" not in result:
        raise RuntimeError(f"order {_arg(task, 0)} exists: the task is malformed")
    return f"Order {_arg(task, 0)} was not found."


# policy_question (no tool needed) -----------------------------------------------------------
def _pick_policy_question(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    key = rng.choice(sorted(POLICIES))
    return (key, str(rng.randrange(len(POLICIES[key][0]))))


def _build_policy_question(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    questions, fact = POLICIES[a[0]]
    return questions[int(a[1])], {"phrase": fact}


def _solve_policy_question(task: Task) -> Solver:
    return f"Our policy: {POLICIES[_arg(task, 0)][1]}."
    yield  # pragma: no cover - makes this a generator that calls no tool


# refund_latest_order (4 chained calls, write) -----------------------------------------------
def _pick_refund_latest(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(
        db,
        rng,
        "SELECT c.email FROM customers c JOIN orders o USING(customer_id) "
        "WHERE o.created = (SELECT MAX(created) FROM orders x WHERE x.customer_id=c.customer_id) "
        "AND o.status='delivered'",
    )
    return (row[0], rng.choice(("EUR", "GBP", "CAD"))) if row else None


def _build_refund_latest(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    order_id = db.execute(_LATEST, (a[0],)).fetchone()[0]
    goal = f"I'm {a[0]}. Please refund my latest order and tell me the amount in {a[1]}."
    check = {"state": {order_id: "refunded"}, "number": _convert(_order_total(db, order_id), a[1])}
    return goal, check


def _solve_refund_latest(task: Task) -> Solver:
    customer = yield Call("find_customer", {"email": _arg(task, 0)})
    listing = yield Call("list_orders", {"customer_id": customer["customer_id"]})
    latest = listing["orders"][-1]
    yield Call("update_order_status", {"order_id": latest["order_id"], "status": "refunded"})
    cur = _arg(task, 1)
    fx = yield Call(
        "convert_currency",
        {"amount": latest["total_usd"], "from_currency": "USD", "to_currency": cur},
    )
    return f"Order {latest['order_id']} is refunded: {fx['amount']:.2f} {cur}."


# customer_spend (sum values out of a tool result) -------------------------------------------
def _pick_customer_spend(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(
        db,
        rng,
        "SELECT customer_id FROM orders WHERE status='delivered' GROUP BY customer_id "
        "HAVING COUNT(*) BETWEEN 2 AND 4",
    )
    return (row[0],) if row else None


def _build_customer_spend(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    orders = db.execute(
        "SELECT order_id FROM orders WHERE customer_id=? AND status='delivered'", (a[0],)
    ).fetchall()
    total = _money(sum(_order_total(db, oid) for (oid,) in orders))
    return f"How much has customer {a[0]} spent on delivered orders, in USD?", {"number": total}


def _solve_customer_spend(task: Task) -> Solver:
    listing = yield Call("list_orders", {"customer_id": _arg(task, 0)})
    delivered = [o["total_usd"] for o in listing["orders"] if o["status"] == "delivered"]
    total = yield Call("calculate", {"expression": " + ".join(f"{t:.2f}" for t in delivered)})
    return f"Customer {_arg(task, 0)} spent {total['result']:.2f} USD."


# ask_order_id (multi-turn: the agent must ask for the missing order id) ----------------------
_ASK_QUESTIONS = (
    "What is the status of my order?",
    "Where is my order? It has not arrived yet.",
    "Can you check on my order for me?",
)
_GIVE_ID = ("It's order {o}.", "The order id is {o}.", "Sure, it is {o}.")
ORDER_ID = re.compile(r"\bO-\d+\b")


def _pick_ask_order_id(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    row = _pick(db, rng, "SELECT order_id FROM orders")
    return (row[0], str(rng.randrange(len(_ASK_QUESTIONS)))) if row else None


def _build_ask_order_id(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    status = _one(db, "SELECT status FROM orders WHERE order_id=?", a[0])
    check = {"word": status, "rivals": list(STATUSES), "looked_up": a[0]}
    return _ASK_QUESTIONS[int(a[1])], check


def _asks_for_order_id(text: str) -> bool:
    low = text.lower()
    return "?" in text or re.search(r"\border\s*(?:id|number)\b", low) is not None


def _user_ask_order_id(task: Task, messages: Sequence[dict[str, Any]]) -> str | None:
    """Gives the order id once, when the agent asks for it; says nothing more after that."""
    reply = _GIVE_ID[int(_arg(task, 1))].format(o=_arg(task, 0))
    if reply in _user_texts(messages) or not _asks_for_order_id(_last_text(messages)):
        return None
    return reply


def _solve_ask_order_id(task: Task) -> Solver:
    reply = yield AskUser("Could you tell me your order id?")
    found = ORDER_ID.search(reply.text)
    if found is None:
        return "I need your order id to look up your order."
    order = yield Call("get_order", {"order_id": found.group(0)})
    return f"Order {order['order_id']} is {order['status']}."


# confirm_write (multi-turn: a write only after the user's explicit "yes") --------------------
_ACTIONS = {"cancel": ("pending", "cancelled"), "refund": ("delivered", "refunded")}
_CONFIRM_GOALS = {
    "cancel": "Please cancel order {o}, but ask me to confirm before you do it.",
    "refund": "I'd like a refund for order {o}. Check with me before you make the change.",
}
CONFIRM = "Yes, please go ahead."


def _pick_confirm_write(db: sqlite3.Connection, rng: random.Random) -> Args | None:
    action = rng.choice(sorted(_ACTIONS))
    status = _ACTIONS[action][0]
    row = _pick(db, rng, f"SELECT order_id FROM orders WHERE status='{status}'")
    return (row[0], action) if row else None


def _build_confirm_write(db: sqlite3.Connection, a: Args) -> tuple[str, dict[str, Any]]:
    needed, result = _ACTIONS[a[1]]
    if _one(db, "SELECT status FROM orders WHERE order_id=?", a[0]) != needed:
        raise ValueError(f"order {a[0]} is not {needed}: it cannot be {result}")
    check = {"state": {a[0]: result}, "word": result, "confirm_before": "update_order_status"}
    return _CONFIRM_GOALS[a[1]].format(o=a[0]), check


def _user_confirm_write(task: Task, messages: Sequence[dict[str, Any]]) -> str | None:
    """Says "yes" once, to a question about this order or this action; nothing else."""
    text = _last_text(messages)
    about = _arg(task, 0) in text or _arg(task, 1) in text.lower()
    if CONFIRM in _user_texts(messages) or "?" not in text or not about:
        return None
    return CONFIRM


def _solve_confirm_write(task: Task) -> Solver:
    order_id, action = _arg(task, 0), _arg(task, 1)
    reply = yield AskUser(f"Just to confirm: shall I {action} order {order_id}?")
    if not reply.text.lower().startswith("yes"):
        return f"Understood, order {order_id} stays as it is."
    status = _ACTIONS[action][1]
    done = yield Call("update_order_status", {"order_id": order_id, "status": status})
    return f"Order {done['order_id']} has been {status}."


def _user_texts(messages: Sequence[dict[str, Any]]) -> list[str]:
    return [str(m.get("content") or "") for m in messages if m.get("role") == "user"]


def _last_text(messages: Sequence[dict[str, Any]]) -> str:
    """The latest assistant message's text (what the user answers)."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return str(message.get("content") or "")
    return ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("order_status", _pick_order_status, _build_order_status, _solve_order_status),
        Family("customer_tier", _pick_customer_tier, _build_customer_tier, _solve_customer_tier),
        Family("product_price", _pick_product_price, _build_product_price, _solve_product_price),
        Family(
            "policy_question", _pick_policy_question, _build_policy_question, _solve_policy_question
        ),
        Family("missing_order", _pick_missing_order, _build_missing_order, _solve_missing_order),
        Family("cancel_order", _pick_cancel_order, _build_cancel_order, _solve_cancel_order),
        Family(
            "order_total_fx", _pick_order_total_fx, _build_order_total_fx, _solve_order_total_fx
        ),
        Family(
            "latest_order_by_email",
            _pick_latest_order_by_email,
            _build_latest_order_by_email,
            _solve_latest_order_by_email,
        ),
        Family(
            "customer_spend", _pick_customer_spend, _build_customer_spend, _solve_customer_spend
        ),
        Family(
            "refund_latest_order", _pick_refund_latest, _build_refund_latest, _solve_refund_latest
        ),
        Family(
            "ask_order_id",
            _pick_ask_order_id,
            _build_ask_order_id,
            _solve_ask_order_id,
            _user_ask_order_id,
        ),
        Family(
            "confirm_write",
            _pick_confirm_write,
            _build_confirm_write,
            _solve_confirm_write,
            _user_confirm_write,
        ),
    )
}


def oracle_solver(task: Task) -> Solver:
    """The oracle for a task: a generator of tool calls that receives each parsed result."""
    if task.family not in FAMILIES:
        raise KeyError(f"support_desk has no task family {task.family!r}")
    return FAMILIES[task.family].solve(task)
