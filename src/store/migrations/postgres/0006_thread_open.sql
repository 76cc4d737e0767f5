-- A reply thread's conversation also says whether it is open: a reply that reopens a closed
-- one beside another open conversation counts both among the customer's open conversations.
-- The function is 0004's, with `open` added to the thread rows.
CREATE OR REPLACE FUNCTION switchboard_batch_reads(
    published_channels text[], published_externals text[],
    lock_keys bigint[],
    channel_ids text[], external_ids text[],
    kinds text[], addresses text[],
    reopen_after bigint, contacts_after bigint, history_len bigint,
    thread_channels text[], thread_keys text[]
) RETURNS json LANGUAGE plpgsql AS $$
DECLARE
    -- Named apart from the tables, so no column reference can mean a variable.
    existing_rows json;
    known_rows json;
    known_ids text[];
    identity_rows json;
    conversation_rows json;
    contact_rows json;
    history_rows json;
    thread_rows json;
BEGIN
    INSERT INTO published_decisions (channel_id, external_id)
    SELECT * FROM unnest(published_channels, published_externals)
    ON CONFLICT DO NOTHING;

    -- `unnest` yields the keys in array order, so the locks are taken in the caller's order.
    PERFORM pg_advisory_xact_lock(key) FROM unnest(lock_keys) AS key;

    SELECT json_agg(e) INTO existing_rows FROM (
        SELECT d.channel_id, d.external_id, d.assignment, d.queue, d.priority,
               p.channel_id IS NOT NULL AS published
        FROM unnest(channel_ids, external_ids) AS k(channel_id, external_id)
        JOIN decisions d ON d.channel_id = k.channel_id AND d.external_id = k.external_id
        LEFT JOIN published_decisions p
          ON p.channel_id = d.channel_id AND p.external_id = d.external_id
    ) AS e;

    SELECT json_agg(f), array_agg(DISTINCT f.id) INTO known_rows, known_ids FROM (
        SELECT i.kind, i.address, c.id, c.attributes, c.merged_into
        FROM unnest(kinds, addresses) AS j(kind, address)
        JOIN identities i ON i.kind = j.kind AND i.address = j.address
        JOIN customers c ON c.id = i.customer_id
        ORDER BY c.id
        FOR NO KEY UPDATE OF c
    ) AS f;
    known_ids := coalesce(known_ids, '{}');

    SELECT json_agg(i ORDER BY i.created_at, i.kind, i.address) INTO identity_rows FROM (
        SELECT customer_id, kind, address, created_at FROM identities
        WHERE customer_id = ANY(known_ids)
    ) AS i;

    SELECT json_agg(c ORDER BY c.open DESC, c.last_activity_at DESC) INTO conversation_rows FROM (
        SELECT id, customer_id, status = 'open' AS open, channels, message_count, opened_at,
               agent_id, queue, last_activity_at
        FROM conversations
        WHERE customer_id = ANY(known_ids) AND (status = 'open' OR closed_at > reopen_after)
        ORDER BY customer_id, id
        FOR NO KEY UPDATE
    ) AS c;

    SELECT json_agg(n) INTO contact_rows FROM (
        SELECT customer_id, count(*) AS count FROM messages
        WHERE customer_id = ANY(known_ids) AND received_at > contacts_after
        GROUP BY customer_id
    ) AS n;

    -- Per customer, only its latest rows are read (index on customer, time, seq).
    SELECT json_agg(h ORDER BY h.customer_id, h.received_at, h.seq) INTO history_rows FROM (
        SELECT c.id AS customer_id, m.channel, m.text, m.received_at, m.seq
        FROM unnest(known_ids) AS c(id)
        CROSS JOIN LATERAL (
            SELECT envelope #>> '{channel,kind}' AS channel, envelope ->> 'text' AS text,
                   received_at, seq
            FROM messages WHERE customer_id = c.id
            ORDER BY received_at DESC, seq DESC LIMIT history_len) AS m
    ) AS h;

    SELECT json_agg(t) INTO thread_rows FROM (
        SELECT k.channel_id, k.thread_key, c.id, c.customer_id, c.status = 'open' AS open,
               c.channels, c.message_count, c.opened_at, c.agent_id, c.queue
        FROM unnest(thread_channels, thread_keys) AS k(channel_id, thread_key)
        CROSS JOIN LATERAL (
            SELECT conversation_id FROM messages
            WHERE channel_id = k.channel_id AND thread_key = k.thread_key
            ORDER BY received_at DESC, seq DESC LIMIT 1) AS m
        JOIN conversations c ON c.id = m.conversation_id
        FOR NO KEY UPDATE OF c
    ) AS t;

    RETURN json_build_object(
        'existing', existing_rows, 'known', known_rows, 'identities', identity_rows,
        'conversations', conversation_rows, 'contacts', contact_rows, 'history', history_rows,
        'threads', thread_rows);
END
$$;
