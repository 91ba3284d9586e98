/**
 * Storing events: a group of batches, of one source or several, in ONE buffer transaction with
 * each source's checkpoint (checkpoints.ts), so the checkpoint can never name a change that is
 * not stored, and a stored change is never read again from the slot. Streamed transactions'
 * staged rows, their commits and aborts, snapshot progress and schema versions go in the same
 * transaction.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import type { Logger } from '../common/logger.js';
import { copyPieces, type BatchMessage, type SchemaChange } from '../common/protocol.js';
import {
  COPY_BINARY_HEADER,
  COPY_BINARY_TRAILER,
  EVENT_COPY_COLUMNS,
} from '../common/buffer-format.js';
import { checkpointUpsert } from './checkpoints.js';
import { asFencedError, type LeaseBook } from './leases.js';
import { storeSnapshotProgress } from './snapshots.js';

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

/** Below this, a group's rows go to COPY as one chunk: one socket write instead of one per batch. */
const CONCAT_BELOW_BYTES = 1024 * 1024;

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
 * Stores several sources' batches in ONE transaction, each source's checkpoint with them: one
 * COPY and one checkpoint upsert for all, so a fleet of sources at a steady rate costs the
 * buffer one commit where it would cost one per source. Returns each part's result, in order.
 * Every part must be a different source (one source's batches are one part, in order).
 *
 * A failure before COMMIT rolled everything back (the caller may retry parts alone); a failure
 * of the COMMIT itself leaves the outcome unknown (the connection may have died after the
 * server committed) and is thrown as a CommitOutcomeUnknownError: retrying would store twice.
 */
export async function storeGroup(
  pool: pg.Pool,
  log: Logger,
  parts: readonly StoreGroupPart[],
  book: LeaseBook | null,
): Promise<StoredGroup[]> {
  const client = await pool.connect();
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
    // The fence first, so that it holds every part's lease row until the COMMIT, then the
    // checkpoints (within the transaction the order does not matter): all share the BEGIN's
    // round trip.
    const fence = book?.fence(
      client,
      parts.map((p) => p.sourceId),
    );
    await client.query(
      [
        'BEGIN',
        ...(fence ? [fence] : []),
        ...(checkpoints.length > 0 ? [checkpointUpsert(client, checkpoints)] : []),
      ].join('; '),
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
          else await client.query(COMMIT_STAGED, [part.sourceId, op.xid, op.lsn, op.committedAtUs]);
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
          if (await recordSchema(client, part.sourceId, change)) added++;
        }
      }
      if (added > 0) results[i] = { ...results[i]!, schemaVersionsAdded: added };
    }
    try {
      await client.query('COMMIT');
    } catch (error) {
      throw new CommitOutcomeUnknownError(error);
    }
    deleteCommittedStaged(pool, log, parts);
    return results;
  } catch (error) {
    broken = true;
    await client.query('ROLLBACK').catch(() => undefined);
    throw asFencedError(error) ?? error;
  } finally {
    // A client whose transaction failed midway (e.g. the server went away) is not reused.
    client.release(broken);
  }
}

function deleteCommittedStaged(pool: pg.Pool, log: Logger, parts: readonly StoreGroupPart[]): void {
  for (const part of parts) {
    const xids = part.batches.flatMap((b) =>
      b.streamOps.filter((op) => op.op === 'commit').map((op) => op.xid),
    );
    if (xids.length === 0) continue;
    pool
      .query(DELETE_COMMITTED, [part.sourceId, xids])
      .catch((error: unknown) =>
        log.warn(
          { err: error, source: part.sourceId },
          'deleting the staged rows of committed transactions failed; the next start deletes them',
        ),
      );
  }
}

async function recordSchema(
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
