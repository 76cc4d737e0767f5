-- SLA overflow on the embedded bus: an assignment carries the moment its queue's SLA passes;
-- past it, a waiting (not leased) assignment moves back to the router queue, which overflows it.
ALTER TABLE bus_messages ADD COLUMN expires_at INTEGER;
CREATE INDEX bus_messages_expiry ON bus_messages(expires_at) WHERE expires_at IS NOT NULL;

-- Lifecycle events (`<p>.events` on RabbitMQ), newest 10,000 kept, read through
-- GET /api/v1/events.
CREATE TABLE bus_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    type         TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
