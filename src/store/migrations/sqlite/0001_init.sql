-- Customers, their identities, conversations, messages and routing decisions.
-- Timestamps are Unix milliseconds (UTC).

CREATE TABLE customers (
    id            TEXT PRIMARY KEY,
    attributes    TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL
);

CREATE TABLE identities (
    kind          TEXT NOT NULL,
    address       TEXT NOT NULL,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    verified      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (kind, address)
);
CREATE INDEX identities_customer ON identities(customer_id);

CREATE TABLE conversations (
    id               TEXT PRIMARY KEY,
    customer_id      TEXT NOT NULL REFERENCES customers(id),
    status           TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    channels         TEXT NOT NULL DEFAULT '[]',
    queue            TEXT,
    agent_id         TEXT,
    message_count    INTEGER NOT NULL DEFAULT 0,
    opened_at        INTEGER NOT NULL,
    last_activity_at INTEGER NOT NULL,
    closed_at        INTEGER
);
CREATE INDEX conversations_customer_status ON conversations(customer_id, status);

CREATE TABLE messages (
    channel_id       TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    conversation_id  TEXT NOT NULL REFERENCES conversations(id),
    customer_id      TEXT NOT NULL REFERENCES customers(id),
    direction        TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    envelope         TEXT NOT NULL,
    received_at      INTEGER NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
CREATE INDEX messages_customer_time ON messages(customer_id, received_at);
CREATE INDEX messages_conversation_time ON messages(conversation_id, received_at);

CREATE TABLE decisions (
    channel_id       TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    conversation_id  TEXT NOT NULL,
    queue            TEXT NOT NULL,
    urgency          INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    assignment       TEXT NOT NULL,
    published        INTEGER NOT NULL DEFAULT 0,
    decided_at       INTEGER NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
CREATE INDEX decisions_conversation ON decisions(conversation_id);
