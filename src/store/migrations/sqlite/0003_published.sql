-- "This decision's assignment was published" moves out of the decisions table: marking a batch
-- published rewrote every (large) decision row of the batch, about one page per message. A
-- narrow table of keys costs a few appended index entries instead.
-- The decisions_conversation index had no reader; each insert paid for a random page write.

CREATE TABLE published_decisions (
    channel_id   TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    PRIMARY KEY (channel_id, external_id)
) WITHOUT ROWID;

INSERT INTO published_decisions (channel_id, external_id)
SELECT channel_id, external_id FROM decisions WHERE published = 1;

DROP INDEX decisions_conversation;
ALTER TABLE decisions DROP COLUMN published;
