/**
 * How far each consumer group is behind, per source: events stored (and readable: below the
 * checkpoint) after its position, WAL bytes between its position and the checkpoint, and how long
 * its oldest unread event has waited. For the metrics, `status` and the status page.
 */
import type pg from 'pg';

/**
 * A read of the first rows after a consumer's position, by the primary key's order: sorts and
 * bitmap scans off for the statements between this and INDEX_ORDER_END. Before autovacuum has
 * analyzed a partition (a new buffer, a backlog stored minutes ago) the planner guesses a few
 * dozen rows and prefers a bitmap scan of everything after the position and a sort: every batch
 * then reads the whole rest of the backlog (a 200k-event backlog was read at 11k events/s).
 * philotes_read says the same with its function's SET clauses (migration 12).
 */
export const INDEX_ORDER = 'SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off';
export const INDEX_ORDER_END = 'RESET enable_sort; RESET enable_bitmapscan';

/** Counting stops here: a group that far behind is reported as at least this. */
export const LAG_COUNT_CAP = 1_000_000;

export interface ConsumerLag {
  readonly group: string;
  readonly source: string;
  readonly lsn: string;
  readonly seq: number;
  readonly committedAt: Date;
  readonly expired: boolean;
  readonly lagEvents: number;
  readonly lagBytes: number;
  /** Seconds the oldest unread event has been in the buffer; 0 when it has read everything. */
  readonly lagSeconds: number;
}

export async function readConsumerLag(db: pg.ClientBase | pg.Pool): Promise<ConsumerLag[]> {
  const exists = await db.query<{ ok: boolean }>(
    `SELECT to_regclass('cdc_consumer_offsets') IS NOT NULL
        AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'cdc_consumers'::regclass
                      AND attname = 'expired_at') AS ok`,
  );
  if (exists.rows[0]?.ok !== true) return [];
  type LagRow = {
    consumer: string;
    source_id: string;
    lsn: string;
    seq: number;
    committed_at: Date;
    expired: boolean;
    lag_events: string;
    lag_bytes: string | null;
    lag_seconds: number | null;
  };
  // One simple query, so that the plan settings hold for the SELECT alone, on one connection
  // even from a pool: the first rows after each position by the primary key's order, not a scan
  // and sort of everything after it before autovacuum has analyzed (INDEX_ORDER).
  const results = (await db.query(
    `BEGIN; ${INDEX_ORDER};
     SELECT o.consumer, o.source_id, o.lsn::text, o.seq, o.committed_at,
            c.expired_at IS NOT NULL AS expired,
            (SELECT count(*) FROM (SELECT 1 FROM cdc_events e
               WHERE e.source_id = o.source_id AND (e.lsn, e.seq) > (o.lsn, o.seq)
                 AND e.lsn < k.lsn::pg_lsn LIMIT ${LAG_COUNT_CAP}) x)::text AS lag_events,
            greatest(k.lsn::pg_lsn - o.lsn, 0)::text AS lag_bytes,
            (SELECT extract(epoch FROM now() - e.stored_at)::float8 FROM cdc_events e
               WHERE e.source_id = o.source_id AND (e.lsn, e.seq) > (o.lsn, o.seq)
                 AND e.lsn < k.lsn::pg_lsn
               ORDER BY e.lsn, e.seq LIMIT 1) AS lag_seconds
       FROM cdc_consumer_offsets o
       JOIN cdc_consumers c ON c.name = o.consumer
       LEFT JOIN cdc_checkpoints k ON k.source_id = o.source_id
      ORDER BY o.consumer, o.source_id;
     COMMIT`,
  )) as unknown as pg.QueryResult[];
  const r = results[3] as pg.QueryResult<LagRow>;
  return r.rows.map((row) => ({
    group: row.consumer,
    source: row.source_id,
    lsn: row.lsn,
    seq: row.seq,
    committedAt: row.committed_at,
    expired: row.expired,
    lagEvents: Number(row.lag_events),
    lagBytes: row.lag_bytes === null ? 0 : Number(row.lag_bytes),
    lagSeconds: Math.max(0, row.lag_seconds ?? 0),
  }));
}
