"""Messages as a tree (issue 29): every message gets a parent (and an edit the message it edits), every session
a branch anchor.

Existing sessions become one straight branch: each message's parent is the message before it in the order its
turns ran (a user message, then its replies), which is the order the model was sent them in."""

import django.db.models.deletion
from django.db import migrations, models


def straight_branches(apps, schema_editor):
    ChatMessage = apps.get_model("chat", "ChatMessage")
    rows = (
        ChatMessage.objects.using(schema_editor.connection.alias)
        .exclude(role="system")
        .order_by("session_id", "created_at", "id")
        .only("id", "session_id", "role", "reply_to_id", "parent_id")
    )
    changed, session, turns = [], None, []
    for row in rows.iterator(chunk_size=2000):
        if row.session_id != session:
            changed += _chain(turns)
            session, turns = row.session_id, []
        turns.append(row)
        if len(changed) >= 1000:
            ChatMessage.objects.bulk_update(changed, ["parent"])
            changed = []
    changed += _chain(turns)
    ChatMessage.objects.bulk_update(changed, ["parent"], batch_size=1000)


def _chain(rows):
    """One session's messages in the order they were said: a reply right after the message it answers (a
    message queued behind a turn was saved before that turn's reply), each the parent of the next."""
    replies = {}
    for row in rows:
        if row.role == "assistant" and row.reply_to_id is not None:
            replies.setdefault(row.reply_to_id, []).append(row)
    answered = {id(reply) for group in replies.values() for reply in group}
    order = []
    for row in rows:
        if id(row) in answered:
            continue
        order.append(row)
        order += replies.get(row.id, [])
    previous = None
    for row in order:
        row.parent_id = previous
        previous = row.id
    return order


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0009_message_requested_model'),
    ]

    operations = [
        migrations.AddField(
            model_name='chatsession',
            name='branch_anchor',
            field=models.PositiveBigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='chatmessage',
            name='parent',
            field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='children', to='chat.chatmessage'),
        ),
        migrations.AddField(
            model_name='chatmessage',
            name='version_of',
            field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='versions', to='chat.chatmessage'),
        ),
        migrations.RunPython(straight_branches, migrations.RunPython.noop),
    ]
