/**
 * Buffer schema, versioned. Each migration runs once, in order, inside one transaction that holds
 * an advisory lock, so several Philotes processes sharing a buffer can start at the same time.
 */
import type pg from 'pg';

/** Arbitrary constant: "philotes" on a phone keypad. */
const MIGRATION_LOCK_KEY = 74_456_837;

/**
 * The documented read (migrations 9 to 11), made again whenever cdc_events is (partitions.ts:
 * partitioning renames the old table, and a function's row type follows it).
 */
export const READ_FUNCTION = `
      DROP FUNCTION IF EXISTS philotes_read(text, text, int);
      CREATE FUNCTION philotes_read(p_consumer text, p_source text, p_limit int DEFAULT 1000)
      RETURNS SETOF cdc_events LANGUAGE plpgsql STABLE
      -- The primary key's order, never a scan of everything after the position and a sort
      -- (INDEX_ORDER in src/buffer/consumer-stats.ts says why).
      SET enable_sort = off SET enable_bitmapscan = off AS $fn$
      DECLARE
        v_lsn pg_lsn := '0/0';
        v_seq int := -1;
        v_end pg_lsn;
      BEGIN
        PERFORM philotes_consumer_usable(p_consumer, p_source);
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source;
        IF NOT FOUND THEN v_lsn := '0/0'; v_seq := -1; END IF;
        -- Read first: the events below it were committed with it (or before), so the query
        -- below, on a later snapshot, sees every one of them.
        SELECT c.lsn::pg_lsn INTO v_end FROM cdc_checkpoints c WHERE c.source_id = p_source;
        IF v_end IS NULL THEN RETURN; END IF;
        RETURN QUERY
          SELECT e.* FROM cdc_events e
           WHERE e.source_id = p_source AND (e.lsn, e.seq) > (v_lsn, v_seq) AND e.lsn < v_end
           ORDER BY e.lsn, e.seq
           LIMIT p_limit;
      END
      $fn$;`;

const MIGRATIONS: ReadonlyArray<{ version: number; name: string; sql: string }> = [
  {
    version: 1,
    name: 'checkpoints, schema history, events',
    sql: `
      CREATE TABLE IF NOT EXISTS cdc_checkpoints (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        source_id text NOT NULL UNIQUE,
        lsn text NOT NULL,
        transaction_id bigint,
        committed_at timestamptz NOT NULL DEFAULT now(),
        metadata jsonb
      );
      CREATE TABLE IF NOT EXISTS cdc_schema_history (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        source_id text NOT NULL,
        schema_name text NOT NULL,
        table_name text NOT NULL,
        version int NOT NULL,
        columns jsonb NOT NULL,
        primary_key text[] NOT NULL DEFAULT '{}',
        captured_at timestamptz NOT NULL DEFAULT now(),
        lsn text NOT NULL,
        UNIQUE (source_id, schema_name, table_name, version)
      );
      CREATE TABLE IF NOT EXISTS cdc_events (
        source_id text NOT NULL,
        lsn pg_lsn NOT NULL,
        seq int NOT NULL,
        xid bigint NOT NULL,
        committed_at timestamptz NOT NULL,
        schema_name text NOT NULL,
        table_name text NOT NULL,
        operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
        before jsonb,
        after jsonb,
        primary_key text[] NOT NULL DEFAULT '{}',
        unchanged_columns text[],
        stored_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (source_id, lsn, seq)
      );
    `,
  },
  {
    version: 2,
    name: 'confirmable positions, gaps',
    sql: `
      -- The furthest position Philotes may have confirmed to the source's slot, written before
      -- it is confirmed: a slot found further on was moved by someone else. NULL in rows written
      -- by version 1, which did not record it.
      ALTER TABLE cdc_checkpoints ADD COLUMN IF NOT EXISTS confirmed_lsn pg_lsn;
      -- Changes that could not be delivered, recorded when an operator accepts the loss
      -- (philotes-worker reset-source --accept-gap). Changes of the source committed between
      -- from_lsn and to_lsn may be missing from cdc_events.
      CREATE TABLE IF NOT EXISTS cdc_gaps (
        id bigserial PRIMARY KEY,
        source_id text NOT NULL,
        slot_name text NOT NULL,
        from_lsn pg_lsn NOT NULL,
        to_lsn pg_lsn NOT NULL,
        reason text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        details jsonb
      );
      CREATE INDEX IF NOT EXISTS cdc_gaps_source_lsn ON cdc_gaps (source_id, from_lsn);
    `,
  },
  {
    version: 3,
    name: 'event details, MESSAGE events',
    sql: `
      -- What an event says beyond a row: a TRUNCATE's options and the tables truncated with it,
      -- an application message's prefix and content, json columns holding JSON null.
      ALTER TABLE cdc_events ADD COLUMN IF NOT EXISTS details jsonb;
      -- Application messages (and, to come, DDL). NOT VALID: the rows already stored satisfy
      -- the narrower check they were written under, and a large buffer is not scanned.
      ALTER TABLE cdc_events DROP CONSTRAINT IF EXISTS cdc_events_operation_check;
      ALTER TABLE cdc_events ADD CONSTRAINT cdc_events_operation_check
        CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'MESSAGE', 'DDL')) NOT VALID;
    `,
  },
  {
    version: 4,
    name: 'DDL of schema versions, staged streamed transactions',
    sql: `
      -- The DDL event that made a schema version, when the source's DDL is captured.
      ALTER TABLE cdc_schema_history ADD COLUMN IF NOT EXISTS ddl jsonb;
      -- Changes of large transactions the source streams while they are in progress (pgoutput
      -- protocol 2). They wait here, outside cdc_events, until their commit moves them there
      -- (or their abort deletes them). top_xid is the streamed transaction, xid the
      -- (sub)transaction that made the change; seq orders the changes of one top_xid. A reader
      -- start deletes its source's rows: the server streams unfinished transactions again.
      CREATE TABLE IF NOT EXISTS cdc_staged (
        source_id text NOT NULL,
        top_xid bigint NOT NULL,
        seq int NOT NULL,
        xid bigint NOT NULL,
        committed_at timestamptz,
        schema_name text NOT NULL,
        table_name text NOT NULL,
        operation text NOT NULL,
        before jsonb,
        after jsonb,
        primary_key text[] NOT NULL DEFAULT '{}',
        unchanged_columns text[],
        details jsonb,
        PRIMARY KEY (source_id, top_xid, seq)
      );
    `,
  },
  {
    version: 5,
    name: 'snapshots',
    sql: `
      ALTER TABLE cdc_events DROP CONSTRAINT IF EXISTS cdc_events_operation_check;
      ALTER TABLE cdc_events ADD CONSTRAINT cdc_events_operation_check
        CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'MESSAGE', 'DDL', 'SNAPSHOT'))
        NOT VALID;
      -- Each snapshot of a source: why, which tables, when, how many rows.
      CREATE TABLE IF NOT EXISTS cdc_snapshots (
        id bigserial PRIMARY KEY,
        source_id text NOT NULL,
        reason text NOT NULL,
        state text NOT NULL DEFAULT 'running',
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        rows bigint NOT NULL DEFAULT 0
      );
      -- Its progress per table, stored with the chunk's events: a restart resumes after last_key.
      CREATE TABLE IF NOT EXISTS cdc_snapshot_tables (
        snapshot_id bigint NOT NULL REFERENCES cdc_snapshots (id),
        schema_name text NOT NULL,
        table_name text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        last_key text[],
        chunks int NOT NULL DEFAULT 0,
        rows bigint NOT NULL DEFAULT 0,
        -- Keys to read again before the table is done (see workers/snapshot/window.ts).
        pending jsonb NOT NULL DEFAULT '[]',
        PRIMARY KEY (snapshot_id, schema_name, table_name)
      );
      -- Asks for a snapshot of a source's tables ('schema.table' or 'table' for public; NULL:
      -- every published table). The running Philotes begins it within seconds, after any
      -- snapshot before it; \`philotes-worker snapshot\` calls this.
      CREATE OR REPLACE FUNCTION philotes_request_snapshot(source text, tables text[] DEFAULT NULL)
      RETURNS bigint LANGUAGE plpgsql AS $fn$
      DECLARE
        snapshot bigint;
      BEGIN
        IF tables IS NOT NULL AND cardinality(tables) = 0 THEN
          RAISE EXCEPTION 'philotes_request_snapshot: no tables given (NULL means every published table)';
        END IF;
        INSERT INTO cdc_snapshots (source_id, reason) VALUES (source, 'on_demand')
          RETURNING id INTO snapshot;
        INSERT INTO cdc_snapshot_tables (snapshot_id, schema_name, table_name, state)
        SELECT DISTINCT snapshot,
               CASE WHEN cardinality(n) = 1 THEN 'public' ELSE n[1] END,
               n[cardinality(n)], 'running'
          FROM unnest(tables) AS t(name), parse_ident(t.name) AS n
         WHERE cardinality(n) BETWEEN 1 AND 2;
        IF tables IS NOT NULL
           AND (SELECT count(*) FROM cdc_snapshot_tables WHERE snapshot_id = snapshot)
               <> (SELECT count(DISTINCT x) FROM unnest(tables) x) THEN
          RAISE EXCEPTION 'philotes_request_snapshot: a table name is not schema.table: %', tables;
        END IF;
        RETURN snapshot;
      END
      $fn$;
    `,
  },
  {
    version: 6,
    name: 'source identity, retracted events',
    sql: `
      -- Which server and history the source's events come from, recorded with the first
      -- checkpoint and on every start (see src/common/source-history.ts). NULL in rows written
      -- before version 6: the next start records them.
      ALTER TABLE cdc_checkpoints ADD COLUMN IF NOT EXISTS source_system_id text;
      ALTER TABLE cdc_checkpoints ADD COLUMN IF NOT EXISTS source_timeline bigint;
      ALTER TABLE cdc_checkpoints ADD COLUMN IF NOT EXISTS source_database_oid bigint;
      -- Events of a history the source no longer has (restored, failed over, replaced), moved
      -- out of cdc_events by reset-source; the gap (reason 'retracted') says which range.
      CREATE TABLE IF NOT EXISTS cdc_retracted_events (
        LIKE cdc_events,
        gap_id bigint NOT NULL REFERENCES cdc_gaps (id),
        PRIMARY KEY (gap_id, source_id, lsn, seq)
      );
    `,
  },
  {
    version: 7,
    name: 'source status',
    sql: `
      -- What each running Philotes process says about each of its sources: its state, since
      -- when, and its last error, for \`status\` and \`check\` (which run elsewhere). Written on
      -- every change and refreshed every 30 s; a row older than that is a process gone quiet.
      CREATE TABLE IF NOT EXISTS cdc_source_status (
        source_id text NOT NULL,
        reporter text NOT NULL,
        state text NOT NULL,
        since timestamptz NOT NULL,
        last_error text,
        last_error_code text,
        last_error_at timestamptz,
        reported_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (source_id, reporter)
      );
    `,
  },
  {
    version: 8,
    name: 'members and leases',
    sql: `
      -- Each running Philotes process, while it lives: registered at start, its heartbeat moved
      -- with every lease renewal, removed at a clean stop. A member whose expires_at has passed
      -- is gone (killed, frozen, cut off); its leases expire with it. A command that takes a
      -- lease for a moment (reset-source) is a member of role 'command', which the fair share of
      -- the capturing members does not count.
      CREATE TABLE IF NOT EXISTS cdc_members (
        id text PRIMARY KEY,
        role text NOT NULL DEFAULT 'capture',
        host text NOT NULL,
        pid int NOT NULL,
        version text NOT NULL,
        -- Its maxSources (0: no bound but the fair share): what the others may hand it.
        capacity int NOT NULL DEFAULT 0,
        -- Stopping: it still renews the leases its readers finish with, but the others no longer
        -- count it in the fair share, so that they take what it releases at once.
        leaving boolean NOT NULL DEFAULT false,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL
      );
      -- Who captures each source: one row per source, under the buffer's clock. A new owner
      -- always takes a new epoch. The fence (philotes_fence) locks the row FOR KEY SHARE inside
      -- every transaction that stores for the source; epoch is a key column (the unique index
      -- below), so a takeover, which changes it, waits for every fenced transaction in flight and
      -- every later one sees the new epoch, while a renewal (expires_at only) waits for none.
      CREATE TABLE IF NOT EXISTS cdc_leases (
        source_id text PRIMARY KEY,
        owner text,
        epoch bigint NOT NULL,
        acquired_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        UNIQUE (source_id, epoch)
      );
      -- Every change of owner, for the people on call and for the tests that prove no source was
      -- owned twice at once.
      CREATE TABLE IF NOT EXISTS cdc_lease_history (
        id bigserial PRIMARY KEY,
        source_id text NOT NULL,
        owner text,
        epoch bigint NOT NULL,
        event text NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp()
      );
      -- Raises PH001 unless member p_owner holds every source in p_sources with its epoch, and
      -- holds each lease row (FOR KEY SHARE) until the calling transaction ends.
      CREATE OR REPLACE FUNCTION philotes_fence(p_owner text, p_sources text[], p_epochs bigint[])
      RETURNS void LANGUAGE plpgsql AS $fence$
      DECLARE
        held text[];
        missing text[];
      BEGIN
        SELECT coalesce(array_agg(h.source_id), '{}') INTO held FROM (
          SELECT l.source_id FROM cdc_leases l
            JOIN unnest(p_sources, p_epochs) AS w(source_id, epoch) ON w.source_id = l.source_id
           WHERE l.owner = p_owner AND l.epoch = w.epoch
             FOR KEY SHARE OF l) h;
        IF cardinality(held) < cardinality(p_sources) THEN
          SELECT array_agg(s) INTO missing FROM unnest(p_sources) s WHERE s <> ALL (held);
          RAISE EXCEPTION 'fenced: this Philotes process no longer holds the lease of source(s) %', array_to_string(missing, ', ')
            USING ERRCODE = 'PH001', DETAIL = array_to_string(missing, ',');
        END IF;
      END
      $fence$;
    `,
  },
  {
    version: 9,
    name: 'consumers and their positions',
    sql: `
      -- A consumer is a named group that reads the buffer; its position per source is the last
      -- event it has taken for done, (lsn, seq). A source's events are committed in (lsn, seq)
      -- order, one buffer transaction at a time (the lease's epochs follow one another), so a
      -- position per source is enough: nothing is ever committed below it later.
      CREATE TABLE IF NOT EXISTS cdc_consumers (
        name text PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now()
      );
      CREATE TABLE IF NOT EXISTS cdc_consumer_offsets (
        consumer text NOT NULL REFERENCES cdc_consumers (name) ON DELETE CASCADE,
        source_id text NOT NULL,
        lsn pg_lsn NOT NULL,
        seq int NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, source_id)
      );
      CREATE OR REPLACE FUNCTION philotes_create_consumer(p_consumer text)
      RETURNS void LANGUAGE sql AS $fn$
        INSERT INTO cdc_consumers (name) VALUES (p_consumer) ON CONFLICT (name) DO NOTHING
      $fn$;
      -- The documented read: the consumer's next events of a source, in (lsn, seq) order, at most
      -- p_limit, whole transactions only. Events at or past the source's checkpoint belong to a
      -- transaction not completely stored yet (a large one stored in parts, or one a crash cut
      -- off, which the next start removes): they are never returned. An index range on the
      -- primary key (source_id, lsn, seq).
      CREATE OR REPLACE FUNCTION philotes_read(p_consumer text, p_source text, p_limit int DEFAULT 1000)
      RETURNS SETOF cdc_events LANGUAGE plpgsql STABLE AS $fn$
      DECLARE
        v_lsn pg_lsn := '0/0';
        v_seq int := -1;
        v_end pg_lsn;
      BEGIN
        IF NOT EXISTS (SELECT 1 FROM cdc_consumers WHERE name = p_consumer) THEN
          RAISE EXCEPTION 'philotes_read: unknown consumer %: create it with philotes_create_consumer(%)',
            p_consumer, quote_literal(p_consumer) USING ERRCODE = 'PH002';
        END IF;
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source;
        IF NOT FOUND THEN v_lsn := '0/0'; v_seq := -1; END IF;
        -- Read first: the events below it were committed with it (or before), so the query
        -- below, on a later snapshot, sees every one of them.
        SELECT c.lsn::pg_lsn INTO v_end FROM cdc_checkpoints c WHERE c.source_id = p_source;
        IF v_end IS NULL THEN RETURN; END IF;
        RETURN QUERY
          SELECT e.* FROM cdc_events e
           WHERE e.source_id = p_source AND (e.lsn, e.seq) > (v_lsn, v_seq) AND e.lsn < v_end
           ORDER BY e.lsn, e.seq
           LIMIT p_limit;
      END
      $fn$;
      -- The documented commit: the consumer has done everything up to (p_lsn, p_seq). Run it in
      -- the transaction that stores the consumer's effects, and the effects happen exactly once.
      -- A position behind the committed one is refused: two readers of one group and source.
      CREATE OR REPLACE FUNCTION philotes_commit(p_consumer text, p_source text, p_lsn pg_lsn, p_seq int)
      RETURNS void LANGUAGE plpgsql AS $fn$
      DECLARE
        v_lsn pg_lsn;
        v_seq int;
      BEGIN
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source FOR UPDATE;
        IF FOUND AND (p_lsn, p_seq) < (v_lsn, v_seq) THEN
          RAISE EXCEPTION 'philotes_commit: consumer % is at %/% of source %, past %/%: another reader of this group moved it',
            p_consumer, v_lsn, v_seq, p_source, p_lsn, p_seq USING ERRCODE = 'PH003';
        END IF;
        INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq)
        VALUES (p_consumer, p_source, p_lsn, p_seq)
        ON CONFLICT (consumer, source_id) DO UPDATE
           SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, committed_at = now();
      END
      $fn$;
    `,
  },
  {
    version: 10,
    name: 'consumer groups, gaps and retractions for consumers',
    sql: `
      -- A member of a consumer group (role 'consumer') shares the group's sources with the other
      -- members through leases of its own, keyed 'consumer:<group>:<source>' in cdc_leases (a
      -- source id never holds a ':'), fenced like the capture's. The fair share counts the members
      -- of the same group only.
      ALTER TABLE cdc_members ADD COLUMN IF NOT EXISTS consumer_group text;
      -- Events a consumer had taken (its position was past them) that were then retracted: a
      -- source restored or failed over to another history (reset-source, reason 'retracted').
      -- The consumer's position went back to where the retracted range begins, and until the
      -- consumer has undone every retracted event up to (upto_lsn, upto_seq), newest first, it
      -- reads nothing else of the source.
      CREATE TABLE IF NOT EXISTS cdc_consumer_retractions (
        consumer text NOT NULL REFERENCES cdc_consumers (name) ON DELETE CASCADE,
        source_id text NOT NULL,
        gap_id bigint NOT NULL REFERENCES cdc_gaps (id),
        upto_lsn pg_lsn NOT NULL,
        upto_seq int NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, source_id, gap_id)
      );
      -- As in version 9, and: a consumer with a retraction to undo reads nothing (PH004).
      CREATE OR REPLACE FUNCTION philotes_read(p_consumer text, p_source text, p_limit int DEFAULT 1000)
      RETURNS SETOF cdc_events LANGUAGE plpgsql STABLE AS $fn$
      DECLARE
        v_lsn pg_lsn := '0/0';
        v_seq int := -1;
        v_end pg_lsn;
      BEGIN
        IF NOT EXISTS (SELECT 1 FROM cdc_consumers WHERE name = p_consumer) THEN
          RAISE EXCEPTION 'philotes_read: unknown consumer %: create it with philotes_create_consumer(%)',
            p_consumer, quote_literal(p_consumer) USING ERRCODE = 'PH002';
        END IF;
        IF EXISTS (SELECT 1 FROM cdc_consumer_retractions r
                    WHERE r.consumer = p_consumer AND r.source_id = p_source) THEN
          RAISE EXCEPTION 'philotes_read: consumer % has events of source % to undo first: they were retracted (see philotes_read_retracted)',
            p_consumer, p_source USING ERRCODE = 'PH004';
        END IF;
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source;
        IF NOT FOUND THEN v_lsn := '0/0'; v_seq := -1; END IF;
        SELECT c.lsn::pg_lsn INTO v_end FROM cdc_checkpoints c WHERE c.source_id = p_source;
        IF v_end IS NULL THEN RETURN; END IF;
        RETURN QUERY
          SELECT e.* FROM cdc_events e
           WHERE e.source_id = p_source AND (e.lsn, e.seq) > (v_lsn, v_seq) AND e.lsn < v_end
           ORDER BY e.lsn, e.seq
           LIMIT p_limit;
      END
      $fn$;
      -- As in version 9, and: a position whose event is not in cdc_events (retracted while the
      -- consumer worked on it) or with a retraction to undo is refused (PH004), so that the
      -- consumer's transaction, effects and all, rolls back. A position with seq -1 is the one
      -- before the events at its lsn (a gap's from_lsn, a start point): nothing to check.
      CREATE OR REPLACE FUNCTION philotes_commit(p_consumer text, p_source text, p_lsn pg_lsn, p_seq int)
      RETURNS void LANGUAGE plpgsql AS $fn$
      DECLARE
        v_lsn pg_lsn;
        v_seq int;
      BEGIN
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source FOR UPDATE;
        IF FOUND AND (p_lsn, p_seq) < (v_lsn, v_seq) THEN
          RAISE EXCEPTION 'philotes_commit: consumer % is at %/% of source %, past %/%: another reader of this group moved it',
            p_consumer, v_lsn, v_seq, p_source, p_lsn, p_seq USING ERRCODE = 'PH003';
        END IF;
        -- After the lock: a retraction that committed meanwhile is seen here.
        IF EXISTS (SELECT 1 FROM cdc_consumer_retractions r
                    WHERE r.consumer = p_consumer AND r.source_id = p_source)
           OR (p_seq >= 0 AND NOT EXISTS (SELECT 1 FROM cdc_events e
                 WHERE e.source_id = p_source AND e.lsn = p_lsn AND e.seq = p_seq)) THEN
          RAISE EXCEPTION 'philotes_commit: event %/% of source % is no longer in cdc_events: it was retracted (a source restored or failed over); read again',
            p_lsn, p_seq, p_source USING ERRCODE = 'PH004';
        END IF;
        INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq)
        VALUES (p_consumer, p_source, p_lsn, p_seq)
        ON CONFLICT (consumer, source_id) DO UPDATE
           SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, committed_at = now();
      END
      $fn$;
      -- The retracted events the consumer must undo, newest first, the oldest retraction first:
      -- each row is a cdc_events row with the gap's id.
      CREATE OR REPLACE FUNCTION philotes_read_retracted(p_consumer text, p_source text, p_limit int DEFAULT 1000)
      RETURNS SETOF cdc_retracted_events LANGUAGE sql STABLE AS $fn$
        SELECT e.* FROM (
          SELECT r.gap_id, r.upto_lsn, r.upto_seq FROM cdc_consumer_retractions r
           WHERE r.consumer = p_consumer AND r.source_id = p_source
           ORDER BY r.gap_id LIMIT 1) r
          JOIN LATERAL (
            SELECT x.* FROM cdc_retracted_events x
             WHERE x.gap_id = r.gap_id AND x.source_id = p_source
               AND (x.lsn, x.seq) <= (r.upto_lsn, r.upto_seq)
             ORDER BY x.lsn DESC, x.seq DESC LIMIT p_limit) e ON true
      $fn$;
      -- The consumer has undone the retraction's events down to (p_lsn, p_seq): the rest are
      -- below it; once none is left, the retraction is done and the consumer reads on.
      CREATE OR REPLACE FUNCTION philotes_commit_retracted(p_consumer text, p_source text, p_gap bigint, p_lsn pg_lsn, p_seq int)
      RETURNS void LANGUAGE plpgsql AS $fn$
      BEGIN
        UPDATE cdc_consumer_retractions SET upto_lsn = p_lsn, upto_seq = p_seq - 1
         WHERE consumer = p_consumer AND source_id = p_source AND gap_id = p_gap;
        DELETE FROM cdc_consumer_retractions r
         WHERE r.consumer = p_consumer AND r.source_id = p_source AND r.gap_id = p_gap
           AND NOT EXISTS (SELECT 1 FROM cdc_retracted_events x
                            WHERE x.gap_id = r.gap_id AND x.source_id = r.source_id
                              AND (x.lsn, x.seq) <= (r.upto_lsn, r.upto_seq));
      END
      $fn$;
    `,
  },
  {
    version: 11,
    name: 'partitions and retention',
    sql: `
      -- The partitions of cdc_events (by stored_at, see src/buffer/partitions.ts), each range as
      -- it was attached: from_at NULL is the old unpartitioned table attached as the first one.
      -- A dropped partition keeps its row (dropped_at), for the people on call.
      CREATE TABLE IF NOT EXISTS cdc_partitions (
        name text PRIMARY KEY,
        from_at timestamptz,
        to_at timestamptz NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        dropped_at timestamptz,
        dropped_events bigint
      );
      -- A group that retention left behind (retentionMax passed while it had not read a partition
      -- dropped since): it reads nothing more (PH005) until it is deleted and made again.
      ALTER TABLE cdc_consumers ADD COLUMN IF NOT EXISTS expired_at timestamptz;
      ALTER TABLE cdc_consumers ADD COLUMN IF NOT EXISTS expired_reason text;
      CREATE OR REPLACE FUNCTION philotes_consumer_usable(p_consumer text, p_source text)
      RETURNS void LANGUAGE plpgsql STABLE AS $fn$
      DECLARE
        v_expired timestamptz;
        v_reason text;
      BEGIN
        SELECT expired_at, expired_reason INTO v_expired, v_reason FROM cdc_consumers WHERE name = p_consumer;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'unknown consumer %: create it with philotes_create_consumer(%)',
            p_consumer, quote_literal(p_consumer) USING ERRCODE = 'PH002';
        END IF;
        IF v_expired IS NOT NULL THEN
          RAISE EXCEPTION 'consumer % expired at %: %', p_consumer, v_expired, v_reason
            USING ERRCODE = 'PH005',
                  HINT = 'its events were dropped by retention before it read them; delete it (DELETE FROM cdc_consumers WHERE name = ...) and make it again, from a snapshot';
        END IF;
        IF EXISTS (SELECT 1 FROM cdc_consumer_retractions r
                    WHERE r.consumer = p_consumer AND r.source_id = p_source) THEN
          RAISE EXCEPTION 'consumer % has events of source % to undo first: they were retracted (see philotes_read_retracted)',
            p_consumer, p_source USING ERRCODE = 'PH004';
        END IF;
      END
      $fn$;
      ${READ_FUNCTION}
      -- As in version 10, and an expired group is refused (PH005).
      CREATE OR REPLACE FUNCTION philotes_commit(p_consumer text, p_source text, p_lsn pg_lsn, p_seq int)
      RETURNS void LANGUAGE plpgsql AS $fn$
      DECLARE
        v_lsn pg_lsn;
        v_seq int;
      BEGIN
        SELECT o.lsn, o.seq INTO v_lsn, v_seq FROM cdc_consumer_offsets o
         WHERE o.consumer = p_consumer AND o.source_id = p_source FOR UPDATE;
        IF FOUND AND (p_lsn, p_seq) < (v_lsn, v_seq) THEN
          RAISE EXCEPTION 'philotes_commit: consumer % is at %/% of source %, past %/%: another reader of this group moved it',
            p_consumer, v_lsn, v_seq, p_source, p_lsn, p_seq USING ERRCODE = 'PH003';
        END IF;
        -- After the lock: a retraction or an expiry that committed meanwhile is seen here.
        PERFORM philotes_consumer_usable(p_consumer, p_source);
        IF p_seq >= 0 AND NOT EXISTS (SELECT 1 FROM cdc_events e
             WHERE e.source_id = p_source AND e.lsn = p_lsn AND e.seq = p_seq) THEN
          RAISE EXCEPTION 'philotes_commit: event %/% of source % is no longer in cdc_events: it was retracted (a source restored or failed over); read again',
            p_lsn, p_seq, p_source USING ERRCODE = 'PH004';
        END IF;
        INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq)
        VALUES (p_consumer, p_source, p_lsn, p_seq)
        ON CONFLICT (consumer, source_id) DO UPDATE
           SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, committed_at = now();
      END
      $fn$;
    `,
  },
  {
    version: 12,
    name: 'philotes_read reads in the primary key order',
    sql: READ_FUNCTION,
  },
];

/** The buffer schema version this Philotes migrates to. */
export const SCHEMA_VERSION = Math.max(...MIGRATIONS.map((m) => m.version));

export async function migrate(client: pg.Client | pg.PoolClient): Promise<number[]> {
  const applied: number[] = [];
  await client.query('BEGIN');
  try {
    await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY]);
    await client.query(`CREATE TABLE IF NOT EXISTS philotes_migrations (
      version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`);
    const done = await client.query<{ version: number }>('SELECT version FROM philotes_migrations');
    const have = new Set(done.rows.map((r) => r.version));
    for (const m of MIGRATIONS) {
      if (have.has(m.version)) continue;
      await client.query(m.sql);
      await client.query('INSERT INTO philotes_migrations (version, name) VALUES ($1, $2)', [
        m.version,
        m.name,
      ]);
      applied.push(m.version);
    }
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
  return applied;
}
