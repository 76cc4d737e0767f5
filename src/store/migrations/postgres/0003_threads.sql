-- A reply in a platform thread (an email thread, a chat thread) continues the conversation of
-- the thread's latest message: messages remember their thread.
ALTER TABLE messages ADD COLUMN thread_key TEXT;
CREATE INDEX messages_thread ON messages(channel_id, thread_key, received_at)
    WHERE thread_key IS NOT NULL;
