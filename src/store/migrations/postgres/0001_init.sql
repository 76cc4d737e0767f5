-- Customers, their identities, conversations, messages and routing decisions: the SQLite
-- schema (migrations/sqlite 0001 + 0003) without the embedded bus, which is SQLite-only.
-- Timestamps are Unix milliseconds (UTC).

CREATE TABLE customers (
    id            TEXT PRIMARY KEY,
    attributes    JSONB NOT NULL DEFAULT '{}',
    created_at    BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL
);

CREATE TABLE identities (
    kind          TEXT NOT NULL,
    address       TEXT NOT NULL,
    customer_id   TEXT NOT NULL REFERENCES customers(id),
    verified      BOOLEAN NOT NULL DEFAULT false,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (kind, address)
);
CREATE INDEX identities_customer ON identities(customer_id);

CREATE TABLE conversations (
    id               TEXT PRIMARY KEY,
    customer_id      TEXT NOT NULL REFERENCES customers(id),
    status           TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    -- Channel kinds in first-use order.
    channels         JSONB NOT NULL DEFAULT '[]',
    queue            TEXT,
    agent_id         TEXT,
    message_count    BIGINT NOT NULL DEFAULT 0,
    opened_at        BIGINT NOT NULL,
    last_activity_at BIGINT NOT NULL,
    closed_at        BIGINT
);
CREATE INDEX conversations_customer_status ON conversations(customer_id, status);

-- `seq` is insertion order (SQLite's rowid): a batch's messages share one received_at.
CREATE TABLE messages (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY,
    channel_id       TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    conversation_id  TEXT NOT NULL REFERENCES conversations(id),
    customer_id      TEXT NOT NULL REFERENCES customers(id),
    direction        TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    envelope         JSONB NOT NULL,
    received_at      BIGINT NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
CREATE INDEX messages_customer_time ON messages(customer_id, received_at, seq);
CREATE INDEX messages_conversation_time ON messages(conversation_id, received_at, seq);

-- The assignment stays TEXT: it is republished byte for byte on a redelivery.
CREATE TABLE decisions (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY,
    channel_id       TEXT NOT NULL,
    external_id      TEXT NOT NULL,
    conversation_id  TEXT NOT NULL,
    queue            TEXT NOT NULL,
    urgency          SMALLINT NOT NULL,
    priority         SMALLINT NOT NULL,
    assignment       TEXT NOT NULL,
    decided_at       BIGINT NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);

-- "Published" is a narrow table of keys, as in SQLite: marking a batch appends index entries
-- instead of rewriting its (large) decision rows.
CREATE TABLE published_decisions (
    channel_id   TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
