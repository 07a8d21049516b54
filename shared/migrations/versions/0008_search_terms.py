"""report search: the distinct customer names and emails of each account, kept by a trigger

A ``q`` search over an account of millions of orders walked the posting lists of trigrams that
every seeded email shares (``customer``, ``example.test``) in the search document's index: 0.2-0.7
s at 5M orders for one email. Now the report first finds the matching names and emails among the
account's distinct ones (``order_search_terms``, a trigram index over tens of thousands of rows)
and reads their orders through B-tree indexes; the number part of the search gets its own trigram
index (docs/performance.md, "The report under load: the search index").
"""

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"

#: Must stay the value of shared.models.ORDER_SEARCH_STATISTICS (see migration 0007).
STATISTICS = 1000

#: Adds the names and emails of the statement's new or changed orders (an AFTER statement
#: trigger sees them all at once in its transition table, so a bulk load inserts each distinct
#: term once; ``ON CONFLICT`` skips those already known, also under concurrent inserts).
ADD_TERMS = """
CREATE FUNCTION order_search_terms_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_search_terms (account_id, kind, value)
    SELECT account_id, 'name', customer_name FROM changed_orders
    UNION
    SELECT account_id, 'email', customer_email FROM changed_orders
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$
"""


def _trigram_index(name: str, table: str, column: str) -> None:
    """A pg_trgm GIN index on ``lower(column)`` (labelled as in shared.models)."""
    label = f"search_{column}"
    op.create_index(
        name,
        table,
        [sa.literal_column(f"lower({column})").label(label)],
        postgresql_using="gin",
        postgresql_ops={label: "gin_trgm_ops"},
    )


def upgrade() -> None:
    op.create_table(
        "order_search_terms",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.CheckConstraint("kind IN ('name', 'email')", name="kind_known"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("account_id", "kind", "value"),
    )
    op.execute(
        "INSERT INTO order_search_terms (account_id, kind, value)"
        " SELECT DISTINCT account_id, 'name', customer_name FROM orders"
        " UNION SELECT DISTINCT account_id, 'email', customer_email FROM orders"
    )
    _trigram_index("order_search_terms_trgm_idx", "order_search_terms", "value")
    op.execute(ADD_TERMS)
    for event in ("INSERT", "UPDATE"):
        op.execute(
            f"CREATE TRIGGER orders_search_terms_{event.lower()} AFTER {event} ON orders"
            " REFERENCING NEW TABLE AS changed_orders FOR EACH STATEMENT"
            " EXECUTE FUNCTION order_search_terms_add()"
        )
    _trigram_index("orders_number_trgm_idx", "orders", "number")
    op.execute(f"ALTER INDEX orders_number_trgm_idx ALTER COLUMN 1 SET STATISTICS {STATISTICS}")
    op.create_index("orders_account_customer_email_idx", "orders", ["account_id", "customer_email"])
    op.create_index("orders_account_customer_name_idx", "orders", ["account_id", "customer_name"])
    op.execute("ANALYZE orders")
    op.execute("ANALYZE order_search_terms")


def downgrade() -> None:
    op.drop_index("orders_account_customer_name_idx", table_name="orders")
    op.drop_index("orders_account_customer_email_idx", table_name="orders")
    op.drop_index("orders_number_trgm_idx", table_name="orders")
    for event in ("insert", "update"):
        op.execute(f"DROP TRIGGER orders_search_terms_{event} ON orders")
    op.execute("DROP FUNCTION order_search_terms_add()")
    op.drop_table("order_search_terms")
