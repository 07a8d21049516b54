"""report search: a pg_trgm GIN index on the text ``q`` searches (number, name, email)"""

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"

#: Must stay character for character the expression of shared.models.ORDER_SEARCH_DOCUMENT_SQL
#: (the planner matches an expression index by its expression).
DOCUMENT = "lower((((number || chr(31)) || customer_name) || chr(31)) || customer_email)"


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_index(
        "orders_search_trgm_idx",
        "orders",
        [sa.literal_column(DOCUMENT).label("search_document")],
        postgresql_using="gin",
        postgresql_ops={"search_document": "gin_trgm_ops"},
    )


def downgrade() -> None:
    op.drop_index("orders_search_trgm_idx", table_name="orders")
    # The extension stays: other schemas of the same database may use it.
