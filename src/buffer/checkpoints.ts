/**
 * A source's checkpoint in the buffer: where capture resumes, how far Philotes may have confirmed
 * the slot, and the server it came from. Read, moved with a group's events (the upsert
 * writes.ts sends with them), recorded ahead of a confirmation, and cleaned up behind at a
 * restart (events at or past it belong to a transaction a crash cut off).
 */
import type pg from 'pg';
import { inFencedTransaction, type LeaseBook } from './leases.js';
import type { Logger } from '../common/logger.js';
import type { BatchMessage } from '../common/protocol.js';
import type { SourceIdentity } from '../common/source-history.js';

export interface Checkpoint {
  readonly lsn: string;
  readonly transactionId: number | null;
  /** How far Philotes may have confirmed the slot (null in rows written by version 1). */
  readonly confirmedLsn: string | null;
  /** The server and history the events came from (null in rows written before version 6). */
  readonly identity: SourceIdentity | null;
}

export const IDENTITY_COLUMNS = 'source_system_id, source_timeline, source_database_oid';

export function identityValues(identity: SourceIdentity | null | undefined): unknown[] {
  return identity == null
    ? [null, null, null]
    : [identity.systemId, identity.timeline, identity.databaseOid];
}

export async function selectCheckpoint(
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

/**
 * Deletes the source's events at or past `lsn` (all of them for null): events of stored
 * transactions carry commit LSNs below the checkpoint, which is the end of the last stored commit
 * record, so anything at or past it belongs to a transaction cut off by a crash.
 */
export function deleteEventsFrom(
  client: pg.PoolClient,
  sourceId: string,
  lsn: string | null,
): Promise<pg.QueryResult> {
  return lsn === null
    ? client.query('DELETE FROM cdc_events WHERE source_id = $1', [sourceId])
    : client.query('DELETE FROM cdc_events WHERE source_id = $1 AND lsn >= $2::pg_lsn', [
        sourceId,
        lsn,
      ]);
}

/**
 * The statement that moves each part's checkpoint to its last completed transaction, one for all
 * parts, with its values written out (escaped) rather than bound: it then travels in one simple
 * query with the BEGIN, one round trip and one socket write instead of two of each. At a steady
 * rate a buffer transaction is a few small batches, and its round trips are most of its cost.
 */
export function checkpointUpsert(
  client: pg.PoolClient,
  checkpoints: readonly { part: { sourceId: string; slot: string }; batch: BatchMessage }[],
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

/**
 * Before a reader (re)starts: removes anything stored beyond the checkpoint (the first part of
 * a large transaction cut off by a crash) and returns the checkpoint to resume from.
 */
export async function prepareSource(
  pool: pg.Pool,
  log: Logger,
  sourceId: string,
  book: LeaseBook | null,
): Promise<Checkpoint | null> {
  const { row, removed, unstaged } = await inFencedTransaction(
    pool,
    book,
    sourceId,
    async (client) => {
      const row = await selectCheckpoint(client, sourceId, true);
      const removed = await deleteEventsFrom(client, sourceId, row?.lsn ?? null);
      // The source streams a transaction that was in progress again, from its start.
      const unstaged = await client.query('DELETE FROM cdc_staged WHERE source_id = $1', [
        sourceId,
      ]);
      return { row, removed: removed.rowCount ?? 0, unstaged: unstaged.rowCount ?? 0 };
    },
  );
  if (removed || unstaged) {
    log.info(
      { source: sourceId, removed, removedStaged: unstaged },
      'removed events of an incomplete transaction',
    );
  }
  return row;
}

/**
 * Records that Philotes may confirm the slot up to `lsn`, before it does. For a source new to
 * the buffer this is also its first checkpoint: capture starts there, nothing before it is owed.
 */
export async function recordConfirmable(
  pool: pg.Pool,
  sourceId: string,
  slot: string,
  lsn: string,
  identity: SourceIdentity | undefined,
  ddlGap: { fromLsn: string; toLsn: string } | undefined,
  book: LeaseBook | null,
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
  if (ddlGap === undefined && book === null) {
    await pool.query(upsert, values);
    return;
  }
  await inFencedTransaction(pool, book, sourceId, async (client) => {
    await client.query(upsert, values);
    if (ddlGap === undefined) return;
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
  });
}
