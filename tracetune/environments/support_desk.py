"""The built-in environment: a customer-operations desk over a seeded SQLite database.

Tools really execute SQL against a per-episode copy of the database, so write tasks (cancel,
refund) are verified from the final database state and read tasks from the final answer; no
reference trajectory is ever compared. Everything derives from `db_seed`, so the world, the
tasks and the verdicts are reproducible on any machine.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Callable, Generator, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from tracetune.environments.base import Call, Environment, Outcome, Task, Tool, ToolError
from tracetune.environments.safe_math import MathError, evaluate

STATUSES = ("pending", "shipped", "delivered", "cancelled", "refunded")
TIERS = ("bronze", "silver", "gold")
RATES_PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CAD": 1.36, "JPY": 151.2}
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

Solver = Generator[Call, dict[str, Any], str]


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
        customers.append((cid, f"{first.title()} {last.title()}", email, tier, rng.choice(_COUNTRIES)))
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
    """Customer-operations desk: 8 tools, 10 task families from no-tool answers to 4-call chains."""

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
        return [
            Tool("get_customer", "Get a customer by id.", obj({"customer_id": s}), self.get_customer),
            Tool("find_customer", "Find a customer by email.", obj({"email": s}), self.find_customer),
            Tool("get_order", "Get an order with its items.", obj({"order_id": s}), self.get_order),
            Tool("list_orders", "List a customer's orders, oldest first.", obj({"customer_id": s}), self.list_orders),
            Tool("search_products", "Search products by name.", obj({"query": s}), self.search_products),
            Tool("calculate", "Evaluate + - * / arithmetic.", obj({"expression": s}), self.calculate),
            Tool(
                "convert_currency",
                "Convert an amount between currencies.",
                obj({"amount": n, "from_currency": cur, "to_currency": cur}),
                self.convert_currency,
            ),
            Tool(
                "update_order_status",
                "Set an order's status to cancelled or refunded.",
                obj({"order_id": s, "status": {"type": "string", "enum": ["cancelled", "refunded"]}}),
                self.update_order_status,
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
        if self.db.execute(
            "SELECT 1 FROM customers WHERE customer_id=?", (customer_id.strip(),)
        ).fetchone() is None:
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

    def convert_currency(self, amount: float, from_currency: str, to_currency: str) -> dict[str, Any]:
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
        reasons += self._check_state(check)
        success = not reasons
        return Outcome(
            success=success,
            reward=1.0 if success else -1.0,
            details={"reasons": reasons, "calls": self.calls_made, "tool_errors": self.errors},
        )

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
            family = chosen[len(out) % len(chosen)] if attempts <= n else rng.choice(chosen)
            task = FAMILIES[family].make(db, rng)
            if task is not None and task.id not in out:
                out[task.id] = task
        return list(out.values())

    def families(self) -> list[str]:
        return list(FAMILIES)


# ---------------------------------------------------------------------------------------------
# Answer checks: facts that must appear in the final answer.
# ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?(?![\w-])")


def numbers_in(text: str) -> list[float]:
    """Numbers standing alone in text (ids such as O-10423 or C-0042 are not numbers)."""
    return [float(m) for m in _NUMBER.findall(text.replace(",", ""))]


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


# ---------------------------------------------------------------------------------------------
# Task families: how to draw an instance, and an oracle that solves it through the tools.
# ---------------------------------------------------------------------------------------------
class Family:
    """A task family: `make` draws an instance from the world; `solve` is its oracle."""

    def __init__(
        self,
        name: str,
        make: Callable[[sqlite3.Connection, random.Random], Task | None],
        solve: Callable[[Task], Solver],
    ) -> None:
        self.name, self._make, self.solve = name, make, solve

    def make(self, db: sqlite3.Connection, rng: random.Random) -> Task | None:
        return self._make(db, rng)


_ROWS: dict[tuple[int, str], list[tuple[Any, ...]]] = {}


def _pick(db: sqlite3.Connection, rng: random.Random, sql: str) -> tuple[Any, ...] | None:
    """A random row of `sql` over the (read-only) template world; candidate lists are cached."""
    key = (id(db), sql)
    if key not in _ROWS:
        _ROWS[key] = db.execute(sql).fetchall()
    rows = _ROWS[key]
    return rows[rng.randrange(len(rows))] if rows else None


def _make_order_status(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(db, rng, "SELECT order_id, status FROM orders")
    if row is None:
        return None
    goal = rng.choice(("What is the status of order {o}?", "Where is my order {o}?", "Status of {o}?"))
    return Task(
        f"order_status:{row[0]}:{goal[:6]}",
        "order_status",
        goal.format(o=row[0]),
        {"word": row[1], "rivals": list(STATUSES)},
        {"order_id": row[0]},
    )


def _solve_order_status(task: Task) -> Solver:
    order = yield Call("get_order", {"order_id": task.params["order_id"]})
    return f"Order {order['order_id']} is {order['status']}."


def _make_customer_tier(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(db, rng, "SELECT customer_id, tier FROM customers")
    if row is None:
        return None
    return Task(
        f"customer_tier:{row[0]}",
        "customer_tier",
        f"Which loyalty tier is customer {row[0]} in?",
        {"word": row[1], "rivals": list(TIERS)},
        {"customer_id": row[0]},
    )


def _solve_customer_tier(task: Task) -> Solver:
    customer = yield Call("get_customer", {"customer_id": task.params["customer_id"]})
    return f"Customer {customer['customer_id']} is in the {customer['tier']} tier."


def _make_product_price(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(db, rng, "SELECT name, price_usd FROM products")
    if row is None:
        return None
    return Task(
        f"product_price:{row[0]}",
        "product_price",
        f"How much does the {row[0]} cost?",
        {"number": row[1]},
        {"product": row[0]},
    )


def _solve_product_price(task: Task) -> Solver:
    found = yield Call("search_products", {"query": task.params["product"]})
    hit = next(r for r in found["results"] if r["name"] == task.params["product"])
    return f"The {hit['name']} costs {hit['price_usd']:.2f} USD."


def _order_total(db: sqlite3.Connection, order_id: str) -> float:
    row = db.execute(
        "SELECT SUM(qty * unit_price_usd) FROM items WHERE order_id=?", (order_id,)
    ).fetchone()
    return _money(row[0])


def _convert(amount: float, to: str) -> float:
    return _money(amount * RATES_PER_USD[to])


def _make_order_total_fx(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(db, rng, "SELECT order_id FROM orders")
    if row is None:
        return None
    cur = rng.choice(("EUR", "GBP", "CAD", "JPY"))
    return Task(
        f"order_total_fx:{row[0]}:{cur}",
        "order_total_fx",
        f"What is the total of order {row[0]} in {cur}?",
        {"number": _convert(_order_total(db, row[0]), cur)},
        {"order_id": row[0], "currency": cur},
    )


def _solve_order_total_fx(task: Task) -> Solver:
    order = yield Call("get_order", {"order_id": task.params["order_id"]})
    cur = task.params["currency"]
    fx = yield Call(
        "convert_currency", {"amount": order["total_usd"], "from_currency": "USD", "to_currency": cur}
    )
    return f"The total of order {order['order_id']} is {fx['amount']:.2f} {cur}."


def _make_latest_order_by_email(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(
        db,
        rng,
        "SELECT c.email, (SELECT status FROM orders o WHERE o.customer_id=c.customer_id "
        "ORDER BY created DESC LIMIT 1) FROM customers c",
    )
    if row is None or row[1] is None:
        return None
    return Task(
        f"latest_order_by_email:{row[0]}",
        "latest_order_by_email",
        f"I'm {row[0]}. What is the status of my latest order?",
        {"word": row[1], "rivals": list(STATUSES)},
        {"email": row[0]},
    )


def _solve_latest_order_by_email(task: Task) -> Solver:
    customer = yield Call("find_customer", {"email": task.params["email"]})
    listing = yield Call("list_orders", {"customer_id": customer["customer_id"]})
    latest = listing["orders"][-1]
    return f"Your latest order {latest['order_id']} is {latest['status']}."


def _make_cancel_order(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(db, rng, "SELECT order_id FROM orders WHERE status='pending'")
    if row is None:
        return None
    return Task(
        f"cancel_order:{row[0]}",
        "cancel_order",
        f"Please cancel order {row[0]}.",
        {"state": {row[0]: "cancelled"}, "word": "cancelled"},
        {"order_id": row[0]},
    )


def _solve_cancel_order(task: Task) -> Solver:
    done = yield Call("update_order_status", {"order_id": task.params["order_id"], "status": "cancelled"})
    return f"Order {done['order_id']} has been cancelled."


def _make_missing_order(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    oid = f"O-{rng.randint(60000, 99999)}"
    if db.execute("SELECT 1 FROM orders WHERE order_id=?", (oid,)).fetchone():
        return None
    return Task(
        f"missing_order:{oid}",
        "missing_order",
        f"What is the status of order {oid}?",
        {"phrase": NOT_FOUND, "word": NOT_FOUND, "rivals": list(STATUSES)},
        {"order_id": oid},
    )


def _solve_missing_order(task: Task) -> Solver:
    result = yield Call("get_order", {"order_id": task.params["order_id"]})
    assert "error" in result, "a missing order must produce a tool error"
    return f"Order {task.params['order_id']} was not found."


def _make_policy_question(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    key = rng.choice(sorted(POLICIES))
    questions, fact = POLICIES[key]
    i = rng.randrange(len(questions))
    return Task(f"policy_question:{key}:{i}", "policy_question", questions[i], {"phrase": fact}, {"key": key})


def _solve_policy_question(task: Task) -> Solver:
    fact = POLICIES[task.params["key"]][1]
    return f"Our policy: {fact}."
    yield  # pragma: no cover - makes this a generator that calls no tool


def _make_refund_latest(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(
        db,
        rng,
        "SELECT c.email, o.order_id FROM customers c JOIN orders o USING(customer_id) "
        "WHERE o.created = (SELECT MAX(created) FROM orders x WHERE x.customer_id=c.customer_id) "
        "AND o.status='delivered'",
    )
    if row is None:
        return None
    cur = rng.choice(("EUR", "GBP", "CAD"))
    return Task(
        f"refund_latest_order:{row[0]}:{cur}",
        "refund_latest_order",
        f"I'm {row[0]}. Please refund my latest order and tell me the amount in {cur}.",
        {"state": {row[1]: "refunded"}, "number": _convert(_order_total(db, row[1]), cur)},
        {"email": row[0], "currency": cur},
    )


def _solve_refund_latest(task: Task) -> Solver:
    customer = yield Call("find_customer", {"email": task.params["email"]})
    listing = yield Call("list_orders", {"customer_id": customer["customer_id"]})
    latest = listing["orders"][-1]
    yield Call("update_order_status", {"order_id": latest["order_id"], "status": "refunded"})
    cur = task.params["currency"]
    fx = yield Call(
        "convert_currency", {"amount": latest["total_usd"], "from_currency": "USD", "to_currency": cur}
    )
    return f"Order {latest['order_id']} is refunded: {fx['amount']:.2f} {cur}."


def _make_customer_spend(db: sqlite3.Connection, rng: random.Random) -> Task | None:
    row = _pick(
        db,
        rng,
        "SELECT customer_id FROM orders WHERE status='delivered' GROUP BY customer_id "
        "HAVING COUNT(*) BETWEEN 2 AND 4",
    )
    if row is None:
        return None
    totals = [
        _order_total(db, oid)
        for (oid,) in db.execute(
            "SELECT order_id FROM orders WHERE customer_id=? AND status='delivered'", (row[0],)
        )
    ]
    return Task(
        f"customer_spend:{row[0]}",
        "customer_spend",
        f"How much has customer {row[0]} spent on delivered orders, in USD?",
        {"number": _money(sum(totals))},
        {"customer_id": row[0]},
    )


def _solve_customer_spend(task: Task) -> Solver:
    listing = yield Call("list_orders", {"customer_id": task.params["customer_id"]})
    delivered = [o["total_usd"] for o in listing["orders"] if o["status"] == "delivered"]
    total = yield Call("calculate", {"expression": " + ".join(f"{t:.2f}" for t in delivered)})
    return f"Customer {task.params['customer_id']} spent {total['result']:.2f} USD."


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("order_status", _make_order_status, _solve_order_status),
        Family("customer_tier", _make_customer_tier, _solve_customer_tier),
        Family("product_price", _make_product_price, _solve_product_price),
        Family("policy_question", _make_policy_question, _solve_policy_question),
        Family("missing_order", _make_missing_order, _solve_missing_order),
        Family("cancel_order", _make_cancel_order, _solve_cancel_order),
        Family("order_total_fx", _make_order_total_fx, _solve_order_total_fx),
        Family("latest_order_by_email", _make_latest_order_by_email, _solve_latest_order_by_email),
        Family("customer_spend", _make_customer_spend, _solve_customer_spend),
        Family("refund_latest_order", _make_refund_latest, _solve_refund_latest),
    )
}


def oracle_solver(task: Task) -> Solver:
    """The oracle for a task: a generator of tool calls that receives each parsed result."""
    return FAMILIES[task.family].solve(task)
