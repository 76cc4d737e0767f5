-- Customer merges. A merged customer keeps its row as a tombstone pointing at the survivor;
-- its identities, conversations and messages move to the survivor. `merges` is the audit trail
-- of every merge (status `merged`) and the suggestions left for review (status `suggested`:
-- an unverified identity would have joined two customers).
ALTER TABLE customers ADD COLUMN merged_into TEXT;

CREATE TABLE merges (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL CHECK (status IN ('merged', 'suggested')),
    into_customer     TEXT NOT NULL,
    from_customer     TEXT NOT NULL,
    -- The identity that joined them (none for an explicit merge).
    identity_kind     TEXT,
    identity_address  TEXT,
    -- `verified identity`, `unverified identity` or `api`.
    reason            TEXT NOT NULL,
    -- What moved: identities, conversations, closed conversations, attribute conflicts.
    detail            JSONB NOT NULL DEFAULT '{}',
    created_at        BIGINT NOT NULL
);
CREATE INDEX merges_into ON merges(into_customer, created_at);
CREATE INDEX merges_from ON merges(from_customer, created_at);
-- One open suggestion per pair and identity.
CREATE UNIQUE INDEX merges_one_suggestion ON merges(into_customer, from_customer,
    identity_kind, identity_address) WHERE status = 'suggested';
