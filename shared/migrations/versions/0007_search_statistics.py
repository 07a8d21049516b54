"""report search: a finer histogram of the search document (statistics target 1000)

With PostgreSQL's default target (100), about one ANALYZE in 30 on a 500k-order account made the
planner take a rare ``q`` search for a common one and walk a sort's index instead of the trigram
index (docs/performance.md, "Report plans").
"""

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"

#: Must stay the value of shared.models.ORDER_SEARCH_STATISTICS (a migration never imports the
#: models: it describes the schema as it was at this revision).
STATISTICS = 1000


def upgrade() -> None:
    op.execute(f"ALTER INDEX orders_search_trgm_idx ALTER COLUMN 1 SET STATISTICS {STATISTICS}")
    op.execute("ANALYZE orders")


def downgrade() -> None:
    op.execute("ALTER INDEX orders_search_trgm_idx ALTER COLUMN 1 SET STATISTICS -1")
