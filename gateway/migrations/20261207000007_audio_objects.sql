-- Audio chunks' PCM leaves Postgres for an object store (lossless FLAC; clisonix-audio).
-- A row names its object and is committed only after the object is written, so no
-- reader sees a chunk without its audio. Rows written before keep their PCM inline and
-- are still served: a row has exactly one of the two.
ALTER TABLE audio_chunks
    ALTER COLUMN pcm DROP NOT NULL,
    ADD COLUMN object_key   text,
    ADD COLUMN object_bytes integer,
    ADD CONSTRAINT audio_chunks_pcm_or_object CHECK ((pcm IS NULL) <> (object_key IS NULL));
CREATE UNIQUE INDEX audio_chunks_object ON audio_chunks (object_key) WHERE object_key IS NOT NULL;

-- Objects that may have no row naming them: every object the sink is about to write
-- (committed before the write, so a sink killed between the object and its row leaves
-- this trace) and every object whose row retention deleted. The sink's sweep checks
-- each once it is older than a grace period: an object a row names stays, any other is
-- deleted; then the check goes. A sweep holds the exclusive advisory lock the sink's
-- writes hold shared from before their objects are written until their rows commit,
-- so it never deletes an object whose row is on its way.
CREATE TABLE audio_object_checks (
    object_key text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audio_object_checks_due ON audio_object_checks (created_at);
