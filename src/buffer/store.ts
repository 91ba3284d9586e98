/**
 * The buffer database: events, checkpoints and schema history. A group of batches is stored in
 * ONE transaction together with the checkpoint it reaches, so the checkpoint can never name a
 * change that is not stored, and a stored change is never read again from the slot.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import type { ConnectionConfig } from '../common/config.js';
import { pgClientOptions } from '../common/pg-connection.js';
import { describeConnectionError } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import {
  copyPieces,
  type BatchMessage,
  type PendingSnapshot,
  type SchemaChange,
  type SnapshotProgress,
  type SnapshotTableState,
} from '../common/protocol.js';
import {
  COPY_BINARY_HEADER,
  COPY_BINARY_TRAILER,
  EVENT_COPY_COLUMNS,
} from '../common/buffer-format.js';
import { DATABASE_IDENTITY_SQL, type DatabaseIdentity } from '../common/database-identity.js';
import type { SourceIdentity } from '../common/source-history.js';
import { migrate } from './migrations.js';

/** The readers send rows in binary COPY format; a COPY adds the header and the trailer. */
const COPY_EVENTS = `COPY cdc_events (${EVENT_COPY_COLUMNS.join(', ')}) FROM STDIN (FORMAT binary)`;
/** Staged rows have the same fields; the lsn field holds the streamed transaction's xid. */
const COPY_STAGED = `COPY cdc_staged (${EVENT_COPY_COLUMNS.map((c) => (c === 'lsn' ? 'top_xid' : c)).join(', ')}) FROM STDIN (FORMAT binary)`;
const STAGED_VALUES = EVENT_COPY_COLUMNS.filter(
  (c) => !['source_id', 'lsn', 'seq', 'xid', 'committed_at'].includes(c),
).join(', ');
/**
 * A streamed transaction committed: its staged rows become events at the commit's LSN, with its
 * xid and commit time (µs since 2000-01-01, as pgoutput gives it), keeping their stream order.
 */
const COMMIT_STAGED = `
  INSERT INTO cdc_events (source_id, lsn, seq, xid, committed_at, ${STAGED_VALUES})
  SELECT source_id, $3::pg_lsn, seq, $2,
         timestamptz '2000-01-01 00:00:00+00' + $4::bigint * interval '1 microsecond',
         ${STAGED_VALUES}
    FROM cdc_staged WHERE source_id = $1 AND top_xid = $2`;
/**
 * A committed transaction's staged rows are deleted after the buffer transaction that moved them
 * has committed, outside it: that transaction (and the reader's acknowledgement) need not wait
 * for it. Rows a failed or lost delete leaves are deleted by the source's next start; no commit
 * can move them twice (an xid commits once).
 */
const DELETE_COMMITTED = `DELETE FROM cdc_staged WHERE source_id = $1 AND top_xid = ANY($2::bigint[])`;
const ABORT_STAGED = `DELETE FROM cdc_staged
  WHERE source_id = $1 AND top_xid = $2 AND ($3::bigint IS NULL OR xid = $3)`;

export interface Checkpoint {
  readonly lsn: string;
  readonly transactionId: number | null;
  /** How far Philotes may have confirmed the slot (null in rows written by version 1). */
  readonly confirmedLsn: string | null;
  /** The server and history the events came from (null in rows written before version 6). */
  readonly identity: SourceIdentity | null;
}

/** A range recorded in cdc_gaps (see GapReason); `retract` moves the events from fromLsn on out. */
export interface GapRecord {
  readonly fromLsn: string;
  readonly toLsn: string;
  readonly reason: string;
  readonly details: Record<string, unknown>;
  /** The range's events are of a history that no longer exists: into cdc_retracted_events. */
  readonly retract?: boolean;
}

const IDENTITY_COLUMNS = 'source_system_id, source_timeline, source_database_oid';

function identityValues(identity: SourceIdentity | null | undefined): unknown[] {
  return identity == null
    ? [null, null, null]
    : [identity.systemId, identity.timeline, identity.databaseOid];
}

export interface StoredGroup {
  /** The checkpoint these batches moved to, or null if none of them completed a transaction. */
  readonly checkpointLsn: string | null;
  readonly schemaVersionsAdded: number;
}

/** One source's share of a buffer transaction. */
export interface StoreGroupPart {
  readonly sourceId: string;
  readonly slot: string;
  readonly batches: readonly BatchMessage[];
}

/** COMMIT failed: the transaction may or may not have committed. Never retry what it held. */
export class CommitOutcomeUnknownError extends Error {
  constructor(override readonly cause: unknown) {
    super(
      `the buffer COMMIT failed, its outcome is unknown: ${(cause as Error)?.message ?? String(cause)}`,
    );
    this.name = 'CommitOutcomeUnknownError';
    const code = (cause as { code?: unknown } | null)?.code;
    // Classified like the failure underneath (a lost connection is still a lost connection).
    if (typeof code === 'string') (this as { code?: string }).code = code;
  }
}

/**
 * The statement that moves each part's checkpoint to its last completed transaction, one for all
 * parts, with its values written out (escaped) rather than bound: it then travels in one simple
 * query with the BEGIN, one round trip and one socket write instead of two of each. At a steady
 * rate a buffer transaction is a few small batches, and its round trips are most of its cost.
 */
function checkpointUpsert(
  client: pg.PoolClient,
  checkpoints: readonly { part: StoreGroupPart; batch: BatchMessage }[],
): string {
  const rows = checkpoints.map(({ part, batch }) => {
    const metadata = JSON.stringify({
      slot: part.slot,
      source_committed_at:
        batch.checkpointCommitTimeMs === null
          ? null
          : new Date(batch.checkpointCommitTimeMs).toISOString(),
    });
    const lsn = client.escapeLiteral(batch.checkpointLsn!);
    const xid = batch.checkpointXid === null ? 'NULL' : String(Math.trunc(batch.checkpointXid));
    return `(${client.escapeLiteral(part.sourceId)}, ${lsn}, ${xid}, now(), ${client.escapeLiteral(metadata)}::jsonb, ${lsn}::pg_lsn)`;
  });
  return `INSERT INTO cdc_checkpoints (source_id, lsn, transaction_id, committed_at, metadata, confirmed_lsn)
     VALUES ${rows.join(', ')}
     ON CONFLICT (source_id) DO UPDATE
       SET lsn = EXCLUDED.lsn, transaction_id = EXCLUDED.transaction_id,
           committed_at = EXCLUDED.committed_at, metadata = EXCLUDED.metadata,
           confirmed_lsn = greatest(cdc_checkpoints.confirmed_lsn, EXCLUDED.confirmed_lsn)`;
}

/** Below this, a group's rows go to COPY as one chunk: one socket write instead of one per batch. */
const CONCAT_BELOW_BYTES = 1024 * 1024;

export interface SourceLock {
  /** Rejects if the connection holding the lock is lost (and with it, the lock). */
  readonly lost: Promise<never>;
  release(): Promise<void>;
}

async function selectCheckpoint(
  db: pg.Pool | pg.PoolClient,
  sourceId: string,
  forUpdate: boolean,
): Promise<Checkpoint | null> {
  const result = await db.query<{
    lsn: string;
    transaction_id: string | null;
    confirmed_lsn: string | null;
    source_system_id: string | null;
    source_timeline: string | null;
    source_database_oid: string | null;
  }>(
    `SELECT lsn, transaction_id, confirmed_lsn::text, ${IDENTITY_COLUMNS}
       FROM cdc_checkpoints WHERE source_id = $1${forUpdate ? ' FOR UPDATE' : ''}`,
    [sourceId],
  );
  const row = result.rows[0];
  return row
    ? {
        lsn: row.lsn,
        transactionId: row.transaction_id === null ? null : Number(row.transaction_id),
        confirmedLsn: row.confirmed_lsn,
        identity:
          row.source_system_id === null ||
          row.source_timeline === null ||
          row.source_database_oid === null
            ? null
            : {
                systemId: row.source_system_id,
                timeline: Number(row.source_timeline),
                databaseOid: Number(row.source_database_oid),
              },
      }
    : null;
}

export class BufferStore {
  /** Which database this is, so a reader can tell when its source is this same database. */
  identity: DatabaseIdentity = { identity: '', schema: '' };

  private constructor(
    private readonly pool: pg.Pool,
    private readonly clientOptions: pg.ClientConfig,
    private readonly log: Logger,
  ) {}

  static async open(conn: ConnectionConfig, log: Logger, poolSize: number): Promise<BufferStore> {
    const options = pgClientOptions(conn, 'philotes:buffer');
    const pool = new pg.Pool({ ...options, max: poolSize });
    // An idle client that loses its connection must not crash the process; the next query
    // on a fresh client reports the problem where it can be handled.
    pool.on('error', (error) => log.warn({ err: error }, 'idle buffer connection lost'));
    // pg-pool drops its own 'error' listener while a client is checked out; a connection lost
    // mid-COPY would then be an unhandled 'error' event and kill the process. The failing query
    // rejects as well, and that is where the failure is handled (rollback, reader restart).
    pool.on('connect', (client) =>
      client.on('error', (error) => log.warn({ err: error }, 'buffer connection lost')),
    );
    const store = new BufferStore(pool, { ...options, application_name: 'philotes:lock' }, log);
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (error) {
      await pool.end().catch(() => undefined);
      throw describeConnectionError(error, 'buffer', conn.host, conn.port);
    }
    try {
      const applied = await migrate(client);
      const identity = await client.query<DatabaseIdentity>(DATABASE_IDENTITY_SQL);
      if (identity.rows[0]) store.identity = identity.rows[0];
      log.info(
        { applied },
        applied.length > 0 ? 'buffer schema migrated' : 'buffer schema up to date',
      );
    } catch (error) {
      client.release(true);
      await pool.end().catch(() => undefined);
      throw error;
    }
    client.release();
    return store;
  }

  /**
   * Before a reader (re)starts: removes anything stored beyond the checkpoint (the first part of
   * a large transaction cut off by a crash) and returns the checkpoint to resume from.
   */
  async prepareSource(sourceId: string): Promise<Checkpoint | null> {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      const row = await selectCheckpoint(client, sourceId, true);
      // Events of stored transactions carry commit LSNs below the checkpoint (which is the end
      // of the last stored commit record); anything at or past it belongs to a cut transaction.
      const removed = row
        ? await client.query('DELETE FROM cdc_events WHERE source_id = $1 AND lsn >= $2::pg_lsn', [
            sourceId,
            row.lsn,
          ])
        : await client.query('DELETE FROM cdc_events WHERE source_id = $1', [sourceId]);
      // The source streams a transaction that was in progress again, from its start.
      const unstaged = await client.query('DELETE FROM cdc_staged WHERE source_id = $1', [
        sourceId,
      ]);
      await client.query('COMMIT');
      if (removed.rowCount || unstaged.rowCount) {
        this.log.info(
          { source: sourceId, removed: removed.rowCount, removedStaged: unstaged.rowCount },
          'removed events of an incomplete transaction',
        );
      }
      return row;
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    } finally {
      client.release();
    }
  }

  /** The source's snapshot that has not finished, with each table's progress, if any. */
  async pendingSnapshot(sourceId: string): Promise<PendingSnapshot | null> {
    const snapshot = await this.pool.query<{ id: string; reason: string; rows: string }>(
      `SELECT id, reason, rows FROM cdc_snapshots WHERE source_id = $1 AND state = 'running'
        ORDER BY id LIMIT 1`,
      [sourceId],
    );
    const found = snapshot.rows[0];
    if (found === undefined) return null;
    const id = found.id;
    const tables = await this.pool.query<{
      schema_name: string;
      table_name: string;
      state: SnapshotTableState['state'];
      last_key: string[] | null;
      chunks: number;
      pending: string[][];
    }>(
      `SELECT schema_name, table_name, state, last_key, chunks, pending FROM cdc_snapshot_tables
        WHERE snapshot_id = $1`,
      [id],
    );
    return {
      id: Number(id),
      reason: found.reason,
      rows: Number(found.rows),
      tables: tables.rows.map((t) => ({
        schema: t.schema_name,
        table: t.table_name,
        state: t.state,
        lastKey: t.last_key,
        chunks: t.chunks,
        pending: t.pending,
      })),
    };
  }

  /** Ends a snapshot that cannot run (its state says why). */
  async endSnapshot(id: number, state: string): Promise<void> {
    await this.pool.query(
      `UPDATE cdc_snapshots SET state = $2, finished_at = now() WHERE id = $1 AND state = 'running'`,
      [id, state],
    );
  }

  /** Asks for an on-demand snapshot (see philotes_request_snapshot in the migrations). */
  async requestSnapshot(sourceId: string, tables: readonly string[] | null): Promise<number> {
    const result = await this.pool.query<{ id: string }>(
      'SELECT philotes_request_snapshot($1, $2) AS id',
      [sourceId, tables],
    );
    return Number(result.rows[0]!.id);
  }

  async createSnapshot(sourceId: string, reason: string): Promise<PendingSnapshot> {
    const id = await insertSnapshot(this.pool, sourceId, reason, false);
    return { id, reason, rows: 0, tables: [] };
  }

  /** The stored checkpoint, read without changing anything. */
  async readCheckpoint(sourceId: string): Promise<Checkpoint | null> {
    return selectCheckpoint(this.pool, sourceId, false);
  }

  /**
   * Records accepted gaps and moves the source's checkpoint past them, in one transaction.
   * Events stored at or past the old checkpoint belong to a transaction cut off by a crash: the
   * new checkpoint is past them, so they are removed here or never. A gap with `retract` names
   * events of a history the source no longer has: they move to cdc_retracted_events, under that
   * gap's id, so that the source's events stay one history in (lsn, seq) order.
   */
  async recordGap(reset: {
    sourceId: string;
    slot: string;
    /** The old checkpoint (null: none). */
    checkpointLsn: string | null;
    gaps: readonly GapRecord[];
    /** Where capture resumes: the new checkpoint (and confirmable position). */
    resumeLsn: string;
    /** The server's identity now, recorded with the new checkpoint. */
    identity: SourceIdentity | null;
    /** Begin a snapshot of every published table with the gap (its reason), replacing any other. */
    snapshot?: string | null;
  }): Promise<{
    gapIds: number[];
    removedEvents: number;
    retractedEvents: number;
    snapshotId: number | null;
  }> {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      const gapIds: number[] = [];
      let retractedEvents = 0;
      let retractedSnapshotRows = 0;
      for (const gap of reset.gaps) {
        const inserted = await client.query<{ id: string }>(
          `INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason, details)
           VALUES ($1, $2, $3::pg_lsn, $4::pg_lsn, $5, $6) RETURNING id`,
          [reset.sourceId, reset.slot, gap.fromLsn, gap.toLsn, gap.reason, gap.details],
        );
        const id = Number(inserted.rows[0]!.id);
        gapIds.push(id);
        if (gap.retract) {
          const moved = await client.query<{ events: string; snapshot_rows: string }>(
            `WITH moved AS (
               DELETE FROM cdc_events WHERE source_id = $1 AND lsn >= $2::pg_lsn RETURNING *
             ), kept AS (
               INSERT INTO cdc_retracted_events SELECT moved.*, $3::bigint FROM moved
             )
             SELECT count(*) AS events, count(*) FILTER (WHERE operation = 'SNAPSHOT') AS snapshot_rows
               FROM moved`,
            [reset.sourceId, gap.fromLsn, id],
          );
          retractedEvents += Number(moved.rows[0]!.events);
          retractedSnapshotRows += Number(moved.rows[0]!.snapshot_rows);
        }
      }
      const removed =
        reset.checkpointLsn === null
          ? await client.query('DELETE FROM cdc_events WHERE source_id = $1', [reset.sourceId])
          : await client.query(
              'DELETE FROM cdc_events WHERE source_id = $1 AND lsn >= $2::pg_lsn',
              [reset.sourceId, reset.checkpointLsn],
            );
      await client.query('DELETE FROM cdc_staged WHERE source_id = $1', [reset.sourceId]);
      await client.query(
        `INSERT INTO cdc_checkpoints
           (source_id, lsn, transaction_id, committed_at, metadata, confirmed_lsn, ${IDENTITY_COLUMNS})
         VALUES ($1, $2::text, NULL, now(), $3, $2::text::pg_lsn, $4, $5, $6)
         ON CONFLICT (source_id) DO UPDATE
           SET lsn = EXCLUDED.lsn, transaction_id = NULL, committed_at = EXCLUDED.committed_at,
               metadata = EXCLUDED.metadata, confirmed_lsn = EXCLUDED.confirmed_lsn,
               source_system_id = coalesce(EXCLUDED.source_system_id, cdc_checkpoints.source_system_id),
               source_timeline = coalesce(EXCLUDED.source_timeline, cdc_checkpoints.source_timeline),
               source_database_oid = coalesce(EXCLUDED.source_database_oid, cdc_checkpoints.source_database_oid)`,
        [
          reset.sourceId,
          reset.resumeLsn,
          { slot: reset.slot, gap_id: gapIds[gapIds.length - 1] ?? null },
          ...identityValues(reset.identity),
        ],
      );
      // A snapshot whose rows were retracted, or one running (its progress may name chunks that
      // were), no longer rebuilds the tables: a new one does, of the same kind.
      let snapshotReason = reset.snapshot ?? null;
      if (retractedEvents > 0 && snapshotReason === null) {
        const running = await client.query<{ reason: string }>(
          `SELECT reason FROM cdc_snapshots WHERE source_id = $1 AND state = 'running' ORDER BY id LIMIT 1`,
          [reset.sourceId],
        );
        snapshotReason =
          running.rows[0]?.reason ?? (retractedSnapshotRows > 0 ? 'on_demand' : null);
      }
      const snapshotId =
        snapshotReason === null
          ? null
          : await insertSnapshot(client, reset.sourceId, snapshotReason, true);
      await client.query('COMMIT');
      return { gapIds, removedEvents: removed.rowCount ?? 0, retractedEvents, snapshotId };
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    } finally {
      client.release();
    }
  }

  /**
   * Takes the buffer's session-level advisory lock for a source, on a connection of its own that
   * holds it for the whole reader run. Two processes capturing one source (a rolling deploy, a
   * copy-pasted config) would otherwise interleave: one's start-up cleanup could delete the part
   * of a large transaction the other has stored. Returns null if another process holds it.
   */
  async lockSource(sourceId: string): Promise<SourceLock | null> {
    const client = new pg.Client(this.clientOptions);
    let onLost!: (error: Error) => void;
    const lost = new Promise<never>((_, reject) => {
      onLost = reject;
    });
    lost.catch(() => undefined);
    let released = false;
    client.on('error', (error) => onLost(error));
    client.on('end', () => {
      if (!released)
        onLost(new Error(`lost the buffer connection holding the lock for source "${sourceId}"`));
    });
    await client.connect();
    try {
      const result = await client.query<{ locked: boolean }>(
        `SELECT pg_try_advisory_lock(hashtextextended('philotes:source:' || $1, 0)) AS locked`,
        [sourceId],
      );
      if (!result.rows[0]?.locked) {
        released = true;
        await client.end();
        return null;
      }
    } catch (error) {
      released = true;
      await client.end().catch(() => undefined);
      throw error;
    }
    return {
      lost,
      release: async () => {
        released = true;
        // Ending the session releases the lock.
        await client.end().catch(() => undefined);
      },
    };
  }

  /**
   * Stores several sources' batches in ONE transaction, each source's checkpoint with them: one
   * COPY and one checkpoint upsert for all, so a fleet of sources at a steady rate costs the
   * buffer one commit where it would cost one per source. Returns each part's result, in order.
   * Every part must be a different source (one source's batches are one part, in order).
   *
   * A failure before COMMIT rolled everything back (the caller may retry parts alone); a failure
   * of the COMMIT itself leaves the outcome unknown (the connection may have died after the
   * server committed) and is thrown as a CommitOutcomeUnknownError: retrying would store twice.
   */
  async storeGroup(parts: readonly StoreGroupPart[]): Promise<StoredGroup[]> {
    const client = await this.pool.connect();
    let broken = false;
    try {
      const results: StoredGroup[] = [];
      const checkpoints: { part: StoreGroupPart; batch: BatchMessage }[] = [];
      const data: Buffer[] = [];
      const staged: Buffer[] = [];
      let bytes = 0;
      for (const part of parts) {
        const last = [...part.batches].reverse().find((b) => b.checkpointLsn !== null);
        if (last) checkpoints.push({ part, batch: last });
        results.push({ checkpointLsn: last?.checkpointLsn ?? null, schemaVersionsAdded: 0 });
        for (const batch of part.batches) {
          if (batch.staged !== null) staged.push(...copyPieces(batch.staged, batch.stagedSegments));
          if (batch.rows === 0) continue;
          for (const piece of copyPieces(batch.data, batch.segments)) {
            data.push(piece);
            bytes += piece.length;
          }
        }
      }
      // The checkpoints first: within the transaction the order does not matter, and so they
      // share the BEGIN's round trip.
      await client.query(
        checkpoints.length > 0 ? `BEGIN; ${checkpointUpsert(client, checkpoints)}` : 'BEGIN',
      );
      if (data.length > 0) {
        const chunks = [COPY_BINARY_HEADER, ...data, COPY_BINARY_TRAILER];
        await pipeline(
          Readable.from(bytes < CONCAT_BELOW_BYTES ? [Buffer.concat(chunks)] : chunks),
          client.query(copyFrom(COPY_EVENTS)),
        );
      }
      // Streamed transactions: their staged rows first, then their aborts and commits in stream
      // order (an abort or a commit always follows every staged row it concerns).
      if (staged.length > 0) {
        await pipeline(
          Readable.from([COPY_BINARY_HEADER, ...staged, COPY_BINARY_TRAILER]),
          client.query(copyFrom(COPY_STAGED)),
        );
      }
      for (const part of parts) {
        for (const batch of part.batches) {
          for (const op of batch.streamOps) {
            if (op.op === 'abort')
              await client.query(ABORT_STAGED, [part.sourceId, op.xid, op.subXid]);
            else
              await client.query(COMMIT_STAGED, [part.sourceId, op.xid, op.lsn, op.committedAtUs]);
          }
        }
      }
      for (const part of parts) {
        for (const batch of part.batches) {
          for (const p of batch.snapshotProgress) await storeSnapshotProgress(client, p);
        }
      }
      for (const [i, part] of parts.entries()) {
        let added = 0;
        for (const batch of part.batches) {
          for (const change of batch.schemaChanges) {
            if (await this.recordSchema(client, part.sourceId, change)) added++;
          }
        }
        if (added > 0) results[i] = { ...results[i]!, schemaVersionsAdded: added };
      }
      try {
        await client.query('COMMIT');
      } catch (error) {
        throw new CommitOutcomeUnknownError(error);
      }
      this.deleteCommittedStaged(parts);
      return results;
    } catch (error) {
      broken = true;
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    } finally {
      // A client whose transaction failed midway (e.g. the server went away) is not reused.
      client.release(broken);
    }
  }

  private deleteCommittedStaged(parts: readonly StoreGroupPart[]): void {
    for (const part of parts) {
      const xids = part.batches.flatMap((b) =>
        b.streamOps.filter((op) => op.op === 'commit').map((op) => op.xid),
      );
      if (xids.length === 0) continue;
      this.pool
        .query(DELETE_COMMITTED, [part.sourceId, xids])
        .catch((error: unknown) =>
          this.log.warn(
            { err: error, source: part.sourceId },
            'deleting the staged rows of committed transactions failed; the next start deletes them',
          ),
        );
    }
  }

  /**
   * Records that Philotes may confirm the slot up to `lsn`, before it does. For a source new to
   * the buffer this is also its first checkpoint: capture starts there, nothing before it is owed.
   */
  async recordConfirmable(
    sourceId: string,
    slot: string,
    lsn: string,
    identity?: SourceIdentity,
    ddlGap?: { fromLsn: string; toLsn: string },
  ): Promise<void> {
    const upsert = `INSERT INTO cdc_checkpoints
         (source_id, lsn, committed_at, metadata, confirmed_lsn, ${IDENTITY_COLUMNS})
       VALUES ($1, $2::text, now(), $3, $2::text::pg_lsn, $4, $5, $6)
       ON CONFLICT (source_id) DO UPDATE
         SET confirmed_lsn = greatest(cdc_checkpoints.confirmed_lsn, EXCLUDED.confirmed_lsn),
             source_system_id = coalesce(EXCLUDED.source_system_id, cdc_checkpoints.source_system_id),
             source_timeline = coalesce(EXCLUDED.source_timeline, cdc_checkpoints.source_timeline),
             source_database_oid = coalesce(EXCLUDED.source_database_oid, cdc_checkpoints.source_database_oid)`;
    const values = [sourceId, lsn, { slot, capture_started_at: lsn }, ...identityValues(identity)];
    if (ddlGap === undefined) {
      await this.pool.query(upsert, values);
      return;
    }
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      await client.query(upsert, values);
      // Once per restart of the capture, however many starts see it.
      await client.query(
        `INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason, details)
         SELECT $1, $2, $3::pg_lsn, $4::pg_lsn, 'ddl_not_captured', $5
          WHERE NOT EXISTS (SELECT 1 FROM cdc_gaps WHERE source_id = $1
                               AND reason = 'ddl_not_captured' AND to_lsn = $4::pg_lsn)`,
        [
          sourceId,
          slot,
          ddlGap.fromLsn,
          ddlGap.toLsn,
          {
            what: 'DDL capture was missing or disabled; DDL in this range may be missing (the rows are not)',
          },
        ],
      );
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    } finally {
      client.release();
    }
  }

  private async recordSchema(
    client: pg.PoolClient,
    sourceId: string,
    change: SchemaChange,
  ): Promise<boolean> {
    const columns = JSON.stringify(change.columns);
    // Compared as jsonb: the stored value comes back with jsonb's own key order.
    const latest = await client.query<{ version: number; same: boolean }>(
      `SELECT version, (columns = $4::jsonb AND primary_key = $5::text[]) AS same
         FROM cdc_schema_history
        WHERE source_id = $1 AND schema_name = $2 AND table_name = $3
        ORDER BY version DESC LIMIT 1`,
      [sourceId, change.schema, change.table, columns, change.primaryKey],
    );
    const row = latest.rows[0];
    if (row?.same) return false;
    await client.query(
      `INSERT INTO cdc_schema_history (source_id, schema_name, table_name, version, columns, primary_key, lsn, ddl)
       VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8::jsonb)`,
      [
        sourceId,
        change.schema,
        change.table,
        (row?.version ?? 0) + 1,
        columns,
        change.primaryKey,
        change.lsn,
        change.ddl ? JSON.stringify(change.ddl) : null,
      ],
    );
    return true;
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}

/**
 * A new snapshot of every published table. `replace`: one still running is abandoned (after a
 * gap, its rows so far are no base to build on; the new one copies everything).
 */
async function insertSnapshot(
  db: pg.Pool | pg.PoolClient,
  sourceId: string,
  reason: string,
  replace: boolean,
): Promise<number> {
  if (replace)
    await db.query(
      `UPDATE cdc_snapshots SET state = 'abandoned', finished_at = now()
        WHERE source_id = $1 AND state = 'running'`,
      [sourceId],
    );
  const result = await db.query<{ id: string }>(
    `INSERT INTO cdc_snapshots (source_id, reason) VALUES ($1, $2) RETURNING id`,
    [sourceId, reason],
  );
  return Number(result.rows[0]!.id);
}

/** A snapshot chunk's progress, in the buffer transaction that stores its events. */
async function storeSnapshotProgress(client: pg.PoolClient, p: SnapshotProgress): Promise<void> {
  // An empty table name: the snapshot had nothing (left) to copy; only its end is recorded.
  if (p.table !== '')
    await client.query(
      `INSERT INTO cdc_snapshot_tables
         (snapshot_id, schema_name, table_name, state, last_key, chunks, rows, pending)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
       ON CONFLICT (snapshot_id, schema_name, table_name) DO UPDATE
         SET state = EXCLUDED.state, last_key = EXCLUDED.last_key,
             chunks = greatest(EXCLUDED.chunks, cdc_snapshot_tables.chunks),
             rows = cdc_snapshot_tables.rows + EXCLUDED.rows, pending = EXCLUDED.pending
       -- A table's end without rows (dropped, not published) counts whatever chunk it names.
       WHERE EXCLUDED.chunks >= cdc_snapshot_tables.chunks
          OR EXCLUDED.state IN ('skipped_no_key', 'not_published')`,
      [
        p.snapshotId,
        p.schema,
        p.table,
        p.state,
        p.lastKey,
        p.chunks,
        p.rows,
        JSON.stringify(p.pending),
      ],
    );
  await client.query(
    `UPDATE cdc_snapshots
        SET rows = rows + $2,
            state = CASE WHEN $3 THEN 'done' ELSE state END,
            finished_at = CASE WHEN $3 THEN now() ELSE finished_at END
      WHERE id = $1`,
    [p.snapshotId, p.rows, p.finished],
  );
}
