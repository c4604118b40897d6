"""A log of cancels kept by a trigger on the `orders` table, to check "each unpaid order cancelled
exactly once": a second cancel of the same order shows up as a second row."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, text


def install_cancel_log(engine: Engine) -> None:
    """Create the `cancel_log` table and a trigger that logs every update setting an order to
    CANCELLED (SQLite and PostgreSQL). Used by the demo, scripts/chaos.py and the tests."""
    statements = {
        "sqlite": [
            "CREATE TRIGGER count_cancels AFTER UPDATE OF status ON orders WHEN NEW.status = 'CANCELLED' "
            "BEGIN INSERT INTO cancel_log (order_id) VALUES (NEW.id); END",
        ],
        "postgresql": [
            "CREATE FUNCTION log_cancel() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO cancel_log (order_id) VALUES (NEW.id); RETURN NEW; END $$",
            "CREATE TRIGGER count_cancels AFTER UPDATE OF status ON orders FOR EACH ROW "
            "WHEN (NEW.status = 'CANCELLED') EXECUTE FUNCTION log_cancel()",
        ],
    }[engine.dialect.name]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cancel_log (order_id VARCHAR(255) NOT NULL)"))
        for statement in statements:
            conn.execute(text(statement))


def cancel_log_counts(conn: Connection) -> dict[str, int]:
    """How many times each order was cancelled since the log was installed."""
    rows = conn.execute(text("SELECT order_id, count(*) FROM cancel_log GROUP BY order_id")).all()
    return {order_id: int(count) for order_id, count in rows}
