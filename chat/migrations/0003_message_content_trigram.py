"""A trigram index for the admin's search by message text (PostgreSQL only).

The admin matches `content__icontains`, which PostgreSQL runs as
`UPPER(content) LIKE UPPER('%term%')`: only a trigram GIN index on
`UPPER(content)` serves that, instead of a scan of every message. SQLite (the
embedded default) has no such index and keeps its plain scan.
"""

from django.db import migrations

INDEX = "chat_message_content_trgm"


def create_index(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON chat_chatmessage USING gin (UPPER(content) gin_trgm_ops)"
    )


def drop_index(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("chat", "0002_server_process")]

    operations = [migrations.RunPython(create_index, drop_index, elidable=False)]
