/**
 * What a consumer is given: the buffer's rows as records, one shape for the TypeScript API and
 * for `consume`'s JSON lines. Three kinds, each of one source, in the order they must be handled:
 *
 * - `event`: a change (INSERT, UPDATE, DELETE, TRUNCATE, MESSAGE, DDL) or a SNAPSHOT row (the
 *   row as a snapshot read it: apply it as an upsert), in (lsn, seq) order;
 * - `gap`: the buffer does not have the source's changes between fromLsn and toLsn (an operator
 *   accepted the loss, cdc_gaps): what was built from the events before it may be incomplete;
 *   a snapshot usually follows;
 * - `retracted`: an event this consumer had taken, of a history the source no longer has (it was
 *   restored or failed over): undo it. Retractions come newest first, before anything else.
 */

export interface EventRecord {
  readonly kind: 'event';
  readonly source: string;
  readonly lsn: string;
  readonly seq: number;
  readonly xid: number;
  /** The source transaction's commit time, ISO 8601 with microseconds. */
  readonly committedAt: string;
  readonly schema: string;
  readonly table: string;
  readonly operation: string;
  readonly before: Record<string, unknown> | null;
  readonly after: Record<string, unknown> | null;
  readonly primaryKey: readonly string[];
  /** Columns an UPDATE did not send (unchanged TOASTed values): keep what you have. */
  readonly unchangedColumns: readonly string[] | null;
  /** TRUNCATE options, a message's prefix and content, DDL: see docs/buffer-schema.md. */
  readonly details: Record<string, unknown> | null;
}

export interface GapRecord {
  readonly kind: 'gap';
  readonly source: string;
  readonly gapId: number;
  readonly fromLsn: string;
  readonly toLsn: string;
  readonly reason: string;
  readonly details: Record<string, unknown> | null;
  readonly recordedAt: string;
}

export interface RetractedRecord extends Omit<EventRecord, 'kind'> {
  readonly kind: 'retracted';
  /** The cdc_gaps row (reason 'retracted') that names the lost history's range. */
  readonly gapId: number;
}

export type ConsumedRecord = EventRecord | GapRecord | RetractedRecord;

/** The event columns as records need them, timestamps as text with microseconds. */
export const EVENT_RECORD_COLUMNS = `source_id, lsn::text AS lsn, seq, xid::text AS xid,
  to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS committed_at,
  schema_name, table_name, operation, before, after, primary_key, unchanged_columns, details`;

export interface EventRow {
  readonly source_id: string;
  readonly lsn: string;
  readonly seq: number;
  readonly xid: string;
  readonly committed_at: string;
  readonly schema_name: string;
  readonly table_name: string;
  readonly operation: string;
  readonly before: Record<string, unknown> | null;
  readonly after: Record<string, unknown> | null;
  readonly primary_key: string[];
  readonly unchanged_columns: string[] | null;
  readonly details: Record<string, unknown> | null;
}

export function eventRecord(row: EventRow): EventRecord {
  return {
    kind: 'event',
    source: row.source_id,
    lsn: row.lsn,
    seq: row.seq,
    xid: Number(row.xid),
    committedAt: row.committed_at,
    schema: row.schema_name,
    table: row.table_name,
    operation: row.operation,
    before: row.before,
    after: row.after,
    primaryKey: row.primary_key,
    unchangedColumns: row.unchanged_columns,
    details: row.details,
  };
}

export function retractedRecord(row: EventRow & { gap_id: string }): RetractedRecord {
  return { ...eventRecord(row), kind: 'retracted', gapId: Number(row.gap_id) };
}

export interface GapRow {
  readonly id: string;
  readonly source_id: string;
  readonly from_lsn: string;
  readonly to_lsn: string;
  readonly reason: string;
  readonly details: Record<string, unknown> | null;
  readonly recorded_at: string;
}

export function gapRecord(row: GapRow): GapRecord {
  return {
    kind: 'gap',
    source: row.source_id,
    gapId: Number(row.id),
    fromLsn: row.from_lsn,
    toLsn: row.to_lsn,
    reason: row.reason,
    details: row.details,
    recordedAt: row.recorded_at,
  };
}
