-- The embedded bus (single-node mode): every queue's messages in one table.
-- A message is ready when visible_at <= now; a consumer leases it by moving visible_at into the
-- future and setting lease_id; acknowledging deletes it; an expired lease makes it ready again.

CREATE TABLE bus_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 0,
    body        TEXT NOT NULL,
    headers     TEXT NOT NULL DEFAULT '{}',
    attempts    INTEGER NOT NULL DEFAULT 0,
    visible_at  INTEGER NOT NULL,
    lease_id    TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX bus_messages_ready ON bus_messages(queue, priority DESC, id);
CREATE INDEX bus_messages_lease ON bus_messages(lease_id);
