-- Bumped by every transaction that changes customers, identities, conversations or messages.
-- A store that finds it moved since its own last write knows another store on the same file
-- wrote, and drops its in-memory customer cache.
CREATE TABLE store_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO store_generation (id, n) VALUES (1, 0);
