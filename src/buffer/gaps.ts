/**
 * Accepted gaps: recorded in cdc_gaps with the checkpoint moved past them, in one transaction; a
 * retracted range's events moved to cdc_retracted_events (see docs/design/source-history.md).
 */
import type pg from 'pg';
import { inFencedTransaction, type LeaseBook } from './leases.js';
import type { SourceIdentity } from '../common/source-history.js';
import { deleteEventsFrom, IDENTITY_COLUMNS, identityValues } from './checkpoints.js';
import { insertSnapshot } from './snapshots.js';

/** A range recorded in cdc_gaps (see GapReason); `retract` moves the events from fromLsn on out. */
export interface GapRecord {
  readonly fromLsn: string;
  readonly toLsn: string;
  readonly reason: string;
  readonly details: Record<string, unknown>;
  /** The range's events are of a history that no longer exists: into cdc_retracted_events. */
  readonly retract?: boolean;
}

/**
 * Records accepted gaps and moves the source's checkpoint past them, in one transaction.
 * Events stored at or past the old checkpoint belong to a transaction cut off by a crash: the
 * new checkpoint is past them, so they are removed here or never. A gap with `retract` names
 * events of a history the source no longer has: they move to cdc_retracted_events, under that
 * gap's id, so that the source's events stay one history in (lsn, seq) order.
 */
export async function recordGap(
  pool: pg.Pool,
  reset: {
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
  },
  book: LeaseBook | null,
): Promise<{
  gapIds: number[];
  removedEvents: number;
  retractedEvents: number;
  snapshotId: number | null;
  /** Consumers that had taken retracted events: they undo them before they read on. */
  rewoundConsumers: string[];
}> {
  return inFencedTransaction(pool, book, reset.sourceId, async (client) => {
    const gapIds: number[] = [];
    let retractedEvents = 0;
    let retractedSnapshotRows = 0;
    const rewoundConsumers: string[] = [];
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
        rewoundConsumers.push(...(await rewindConsumers(client, reset.sourceId, gap.fromLsn, id)));
      }
    }
    const removed = await deleteEventsFrom(client, reset.sourceId, reset.checkpointLsn);
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
      snapshotReason = running.rows[0]?.reason ?? (retractedSnapshotRows > 0 ? 'on_demand' : null);
    }
    const snapshotId =
      snapshotReason === null
        ? null
        : await insertSnapshot(client, reset.sourceId, snapshotReason, true);
    return {
      gapIds,
      removedEvents: removed.rowCount ?? 0,
      retractedEvents,
      snapshotId,
      rewoundConsumers,
    };
  });
}

/**
 * Consumers whose position is past the start of a retracted range had taken events of the lost
 * history: each goes back to just before the range (the new history's events there are still
 * to come, and would otherwise be skipped: a silent gap), with a retraction to undo first, up to
 * where it was (cdc_consumer_retractions, migration 10).
 */
async function rewindConsumers(
  client: pg.PoolClient,
  sourceId: string,
  fromLsn: string,
  gapId: number,
): Promise<string[]> {
  const result = await client.query<{ consumer: string }>(
    `WITH past AS (
       SELECT consumer, lsn, seq FROM cdc_consumer_offsets
        WHERE source_id = $1 AND (lsn, seq) >= ($2::pg_lsn, 0) FOR UPDATE),
     pending AS (
       INSERT INTO cdc_consumer_retractions (consumer, source_id, gap_id, upto_lsn, upto_seq)
       SELECT p.consumer, $1, $3, p.lsn, p.seq FROM past p
        WHERE EXISTS (SELECT 1 FROM cdc_retracted_events x
                       WHERE x.gap_id = $3 AND x.source_id = $1
                         AND (x.lsn, x.seq) <= (p.lsn, p.seq)))
     UPDATE cdc_consumer_offsets o SET lsn = $2::pg_lsn, seq = -1, committed_at = now()
       FROM past p WHERE o.consumer = p.consumer AND o.source_id = $1
     RETURNING o.consumer`,
    [sourceId, fromLsn, gapId],
  );
  return result.rows.map((r) => r.consumer);
}
