-- A session ends when ingest publishes a frame carrying the end marker
-- (`clisonix.end`): later frames of it are refused (409 session_ended), so every stage
-- sees the same, final session.
ALTER TABLE ingest_sessions ADD COLUMN ended_at timestamptz;
