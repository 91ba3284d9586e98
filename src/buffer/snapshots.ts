/**
 * Snapshots in the buffer: the one a source has not finished (with each table's progress), asking
 * for one, beginning one, ending one, and a chunk's progress in the transaction that stores its
 * rows.
 */
import type pg from 'pg';
import { inFencedTransaction, type LeaseBook } from './leases.js';
import type { PendingSnapshot, SnapshotProgress, SnapshotTableState } from '../common/protocol.js';

/** The source's snapshot that has not finished, with each table's progress, if any. */
export async function pendingSnapshot(
  pool: pg.Pool,
  sourceId: string,
): Promise<PendingSnapshot | null> {
  const snapshot = await pool.query<{ id: string; reason: string; rows: string }>(
    `SELECT id, reason, rows FROM cdc_snapshots WHERE source_id = $1 AND state = 'running'
      ORDER BY id LIMIT 1`,
    [sourceId],
  );
  const found = snapshot.rows[0];
  if (found === undefined) return null;
  const id = found.id;
  const tables = await pool.query<{
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

/** Ends a snapshot that cannot run (its state says why); fenced for its source. */
export async function endSnapshot(
  pool: pg.Pool,
  book: LeaseBook | null,
  sourceId: string,
  id: number,
  state: string,
): Promise<void> {
  await inFencedTransaction(pool, book, sourceId, (client) =>
    client.query(
      `UPDATE cdc_snapshots SET state = $2, finished_at = now() WHERE id = $1 AND state = 'running'`,
      [id, state],
    ),
  );
}

/** Asks for an on-demand snapshot (see philotes_request_snapshot in the migrations). */
export async function requestSnapshot(
  pool: pg.Pool,
  sourceId: string,
  tables: readonly string[] | null,
): Promise<number> {
  const result = await pool.query<{ id: string }>(
    'SELECT philotes_request_snapshot($1, $2) AS id',
    [sourceId, tables],
  );
  return Number(result.rows[0]!.id);
}

/** The source's initial snapshot, fenced: only the lease's holder begins one. */
export async function createSnapshot(
  pool: pg.Pool,
  book: LeaseBook | null,
  sourceId: string,
  reason: string,
): Promise<PendingSnapshot> {
  const id = await inFencedTransaction(pool, book, sourceId, (client) =>
    insertSnapshot(client, sourceId, reason, false),
  );
  return { id, reason, rows: 0, tables: [] };
}

/**
 * A new snapshot of every published table. `replace`: one still running is abandoned (after a
 * gap, its rows so far are no base to build on; the new one copies everything).
 */
export async function insertSnapshot(
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
export async function storeSnapshotProgress(
  client: pg.PoolClient,
  p: SnapshotProgress,
): Promise<void> {
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
