/**
 * A consumer's reads and commits, inside the transaction its handler is given (consumer.ts): the
 * same rules as philotes_read and philotes_commit (migrations 9 and 10, docs/buffer-schema.md),
 * plus the gaps in order and the retractions to undo first.
 *
 * Order of a source's records: events by (lsn, seq); a gap sorts as (from_lsn, -1), before every
 * event at or past its from_lsn (the checkpoint when it was recorded: every event below it was
 * stored before it). A position (lsn, -1) is the point just before the events at lsn, so a batch
 * that ends in a gap commits (from_lsn, -1) and no gap is delivered twice: the next read wants
 * from_lsn > the position's lsn.
 */
import type pg from 'pg';
import { INDEX_ORDER, INDEX_ORDER_END } from '../buffer/consumer-stats.js';
import { parseLsn } from '../common/lsn.js';
import {
  EVENT_RECORD_COLUMNS,
  eventRecord,
  gapRecord,
  retractedRecord,
  type ConsumedRecord,
  type EventRow,
  type GapRow,
} from './records.js';

/** Retention dropped events the group had not read: it reads nothing more (PH005). */
export class GroupExpiredError extends Error {
  readonly code = 'PH005';
  constructor(
    readonly group: string,
    reason: string,
  ) {
    super(
      `consumer group "${group}" expired: ${reason}. Delete it (DELETE FROM cdc_consumers WHERE name = '${group}') and make it again, from a snapshot of what it builds`,
    );
    this.name = 'GroupExpiredError';
  }
}

/** Where a group begins reading a source it has no position of yet. */
export type StartAt = 'earliest' | 'latest' | { readonly lsn: string };

/** The records of one batch and the commit that takes them for done. */
export interface Batch {
  readonly source: string;
  readonly records: readonly ConsumedRecord[];
  /** Runs in the batch's transaction, after the handler: the position moves past the batch. */
  readonly commit: (client: pg.ClientBase) => Promise<void>;
}

/**
 * Gives the group a position of the source if it has none (`latest`: the source's checkpoint now,
 * so that only what is stored from now on is read; `earliest`: before everything). Committed at once: a later read must not
 * take `latest` again and skip what came meanwhile.
 */
export async function ensurePosition(
  client: pg.ClientBase,
  group: string,
  source: string,
  from: StartAt,
): Promise<void> {
  // `earliest` too has a row: a group holds the partitions of the sources it has a position
  // of (retention, src/buffer/partitions.ts), from the moment it begins one.
  const lsn =
    from === 'latest'
      ? `coalesce((SELECT lsn::pg_lsn FROM cdc_checkpoints WHERE source_id = $2), '0/0')`
      : from === 'earliest'
        ? `'0/0'::pg_lsn`
        : '$3::pg_lsn';
  await client.query(
    `INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq)
     SELECT $1, $2, ${lsn}, -1 ON CONFLICT (consumer, source_id) DO NOTHING`,
    typeof from === 'object' ? [group, source, from.lsn] : [group, source],
  );
}

/** The next batch of the group's records of the source, null when there is nothing new. */
export async function nextBatch(
  client: pg.ClientBase,
  group: string,
  source: string,
  limit: number,
): Promise<Batch | null> {
  // The checkpoint first: events below it were committed with it or before, so the reads below,
  // each on a later snapshot, see every one of them (and the gaps recorded with it).
  const state = await client.query<{
    checkpoint: string | null;
    lsn: string;
    seq: number;
    retracting: boolean;
    expired: string | null;
  }>(
    `SELECT (SELECT c.lsn FROM cdc_checkpoints c WHERE c.source_id = $2) AS checkpoint,
            (SELECT g.expired_reason FROM cdc_consumers g
              WHERE g.name = $1 AND g.expired_at IS NOT NULL) AS expired,
            coalesce(o.lsn, '0/0')::text AS lsn, coalesce(o.seq, -1) AS seq,
            EXISTS (SELECT 1 FROM cdc_consumer_retractions r
                     WHERE r.consumer = $1 AND r.source_id = $2) AS retracting
       FROM (SELECT 1) one
       LEFT JOIN cdc_consumer_offsets o ON o.consumer = $1 AND o.source_id = $2`,
    [group, source],
  );
  const { checkpoint, lsn, seq, retracting, expired } = state.rows[0]!;
  if (expired !== null) throw new GroupExpiredError(group, expired);
  if (retracting) return retractionBatch(client, group, source, limit);
  if (checkpoint === null) return null;
  // Only for this statement: the handler's own queries in the transaction keep the defaults.
  await client.query(INDEX_ORDER);
  const events = await client.query<EventRow>(
    // Ordered by the table's columns (e.lsn, a pg_lsn), not by the output's `lsn` (text, which
    // sorts 0/1000000 before 0/FFFFFF and would skip what lies between), and so by the index.
    `SELECT ${EVENT_RECORD_COLUMNS} FROM cdc_events e
      WHERE e.source_id = $1 AND (e.lsn, e.seq) > ($2::pg_lsn, $3::int) AND e.lsn < $4::pg_lsn
      ORDER BY e.lsn, e.seq LIMIT $5`,
    [source, lsn, seq, checkpoint, limit],
  );
  await client.query(INDEX_ORDER_END);
  const full = events.rows.length === limit;
  const gaps = await client.query<GapRow>(
    `SELECT id::text, source_id, from_lsn::text, to_lsn::text, reason, details,
            to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS recorded_at
       FROM cdc_gaps
      WHERE source_id = $1 AND reason <> 'retracted' AND from_lsn > $2::pg_lsn
        AND from_lsn <= $3::pg_lsn
      ORDER BY from_lsn, id`,
    [source, lsn, full ? events.rows[events.rows.length - 1]!.lsn : checkpoint],
  );
  if (events.rows.length === 0 && gaps.rows.length === 0) return null;
  const records = merge(events.rows.map(eventRecord), gaps.rows.map(gapRecord));
  const last = records[records.length - 1]!;
  const [atLsn, atSeq] = last.kind === 'gap' ? [last.fromLsn, -1] : [last.lsn, last.seq];
  return {
    source,
    records,
    commit: async (c) => {
      await c.query('SELECT philotes_commit($1, $2, $3::pg_lsn, $4)', [
        group,
        source,
        atLsn,
        atSeq,
      ]);
    },
  };
}

/** Retracted events to undo, newest first; committed down to the oldest of the batch. */
async function retractionBatch(
  client: pg.ClientBase,
  group: string,
  source: string,
  limit: number,
): Promise<Batch> {
  const rows = await client.query<EventRow & { gap_id: string }>(
    // Newest first, by the pg_lsn (the output's lsn is text): said here, not left to the plan.
    `SELECT ${EVENT_RECORD_COLUMNS}, gap_id::text FROM philotes_read_retracted($1, $2, $3) x
      ORDER BY x.lsn DESC, x.seq DESC`,
    [group, source, limit],
  );
  const records = rows.rows.map(retractedRecord);
  const oldest = records[records.length - 1];
  return {
    source,
    records,
    commit: async (c) => {
      // None left (a retraction row whose events are all undone): the commit clears it.
      const gap =
        oldest?.gapId ??
        (
          await c.query<{ gap_id: string }>(
            `SELECT gap_id::text FROM cdc_consumer_retractions
              WHERE consumer = $1 AND source_id = $2 ORDER BY gap_id LIMIT 1`,
            [group, source],
          )
        ).rows[0]?.gap_id;
      if (gap === undefined) return;
      await c.query('SELECT philotes_commit_retracted($1, $2, $3, $4::pg_lsn, $5)', [
        group,
        source,
        gap,
        oldest?.lsn ?? '0/0',
        oldest?.seq ?? 0,
      ]);
    },
  };
}

/** Events and gaps of one source in one order: a gap before every event at or past from_lsn. */
function merge(
  events: readonly ConsumedRecord[],
  gaps: readonly ConsumedRecord[],
): ConsumedRecord[] {
  const out: ConsumedRecord[] = [];
  let g = 0;
  for (const event of events) {
    if (event.kind !== 'event') continue;
    while (
      g < gaps.length &&
      parseLsn((gaps[g] as { fromLsn: string }).fromLsn) <= parseLsn(event.lsn)
    )
      out.push(gaps[g++]!);
    out.push(event);
  }
  while (g < gaps.length) out.push(gaps[g++]!);
  return out;
}
