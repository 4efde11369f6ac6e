"""The label project's tables (SQLAlchemy Core), one project per database: SQLite file or PostgreSQL.

    meta         key -> JSON value: app name, schema version, the project's settings, the server secret
    items        what people label: a prompt and its candidates (text or media), optional gold answer
    annotators   people (and the admin) with a hashed secret token each
    assignments  item x annotator, the left/right (or list) order it was shown in, open/done/skipped/expired
    labels       every submission, never deleted: an undo sets retracted_at, the raw export keeps it

Invariants the constraints enforce (so concurrent servers and retries cannot break them):
- `labels.submission_id` is unique: a client retry with the same id never stores a second label;
- one assignment per (item, annotator): nobody is shown the same item twice;
- at most one live (not retracted) label per assignment.
`items.slots_left` counts how many more annotators an item still needs (overlap - live assignments);
the partial index over items with free slots keeps "next item" fast with 100,000 items.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

APP = "rlhfkit-label"
SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "label_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", JSON, nullable=False),
)

items = Table(
    "label_items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(200), nullable=False, unique=True),
    Column("prompt", JSON, nullable=False),          # the original prompt: a string or a message list
    Column("candidates", JSON, nullable=False),      # [{"text": ...} | {"media": "rel/path.gif"}, ...]
    Column("gold", JSON),                            # the known answer (gold items only)
    Column("is_gold", Boolean, nullable=False, default=False),
    Column("priority", Float, nullable=False, default=0.0),  # higher first (e.g. -|reward difference|)
    Column("slots_left", Integer, nullable=False),
    Column("n_labels", Integer, nullable=False, default=0),
    Column("source", JSON),                          # the input row's other fields, kept for export
    Column("created_at", Float, nullable=False),
)
Index("ix_label_items_open", items.c.priority.desc(), items.c.id,
      sqlite_where=items.c.slots_left > 0, postgresql_where=items.c.slots_left > 0)

annotators = Table(
    "label_annotators", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),      # "annotator" or "admin"
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
)

assignments = Table(
    "label_assignments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", Integer, ForeignKey("label_items.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("label_annotators.id"), nullable=False),
    Column("shown_order", JSON, nullable=False),     # candidate indices in the order shown (left first)
    Column("state", String(16), nullable=False),     # open, done, skipped, expired
    Column("created_at", Float, nullable=False),
    UniqueConstraint("item_id", "annotator_id", name="uq_label_assignment"),
)
Index("ix_label_assignments_annotator", assignments.c.annotator_id, assignments.c.state)

labels = Table(
    "label_labels", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("submission_id", String(64), nullable=False, unique=True),
    Column("assignment_id", Integer, ForeignKey("label_assignments.id"), nullable=False),
    Column("item_id", Integer, ForeignKey("label_items.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("label_annotators.id"), nullable=False),
    Column("choice", String(16)),                    # compare: a, b, tie, both_bad; any kind: skip
    Column("strength", String(16)),                  # compare: slightly, clearly
    Column("ranking", JSON),                         # rank: candidate indices, best first
    Column("ratings", JSON),                         # rate: {criterion: [score per candidate]}
    Column("rewrite", JSON),                         # {"index": i, "text": "..."}
    Column("comment", Text),
    Column("duration_ms", Integer),
    Column("created_at", Float, nullable=False),
    Column("retracted_at", Float),
)
Index("ix_label_labels_live", labels.c.assignment_id, unique=True,
      sqlite_where=labels.c.retracted_at.is_(None), postgresql_where=labels.c.retracted_at.is_(None))
Index("ix_label_labels_annotator", labels.c.annotator_id, labels.c.id)
Index("ix_label_labels_item", labels.c.item_id)

# Older schema versions -> a function upgrading a connection in place to the next version. Version 1 is
# the first; a future change adds `MIGRATIONS[1] = _v1_to_v2` and bumps SCHEMA_VERSION.
MIGRATIONS: dict[int, object] = {}
