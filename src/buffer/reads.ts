/**
 * What the commands read from the buffer, on a connection of their own and changing nothing:
 * `status` and `check` run where no Philotes may be running, and a buffer Philotes never started
 * on (no tables yet) is no error for them.
 */
import type pg from 'pg';
import { parseLsn } from '../common/lsn.js';
import type { DurableRecord } from '../common/source-admin.js';

/** A source's cdc_checkpoints row, the whole row as JSON too (its columns differ by version). */
export interface CheckpointRow {
  readonly source_id: string;
  readonly lsn: string;
  readonly confirmed_lsn: string | null;
  readonly committed_at: Date;
  readonly metadata: { source_committed_at?: string | null } | null;
  /** The whole row: the identity columns exist from buffer schema 6 on. */
  readonly row: Record<string, unknown>;
}

/** What a checkpoint row promises, as the slot verdict takes it (confirmed: never behind it). */
export function durableRecordOf(row: CheckpointRow): DurableRecord {
  const checkpointLsn = parseLsn(row.lsn);
  const confirmed = row.confirmed_lsn === null ? checkpointLsn : parseLsn(row.confirmed_lsn);
  return { checkpointLsn, confirmedLsn: confirmed > checkpointLsn ? confirmed : checkpointLsn };
}

/** A source's latest snapshot, as the buffer records it. */
export interface StoredSnapshot {
  readonly id: number;
  readonly reason: string;
  readonly state: string;
  readonly startedAt: string;
  readonly finishedAt: string | null;
  readonly rows: number;
  /** How many of its tables are in each state. */
  readonly tables: Readonly<Record<string, number>>;
}

/** Which of `tables` exist in the buffer. */
export async function tablesPresent(
  client: pg.Client,
  tables: readonly string[],
): Promise<Set<string>> {
  const present = await client.query<{ name: string }>(
    `SELECT t AS name FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL`,
    [tables],
  );
  return new Set(present.rows.map((r) => r.name));
}

/** The buffer schema's version (0: never migrated). */
export async function schemaVersion(client: pg.Client): Promise<number> {
  if (!(await tablesPresent(client, ['philotes_migrations'])).has('philotes_migrations')) return 0;
  const result = await client.query<{ v: number | null }>(
    'SELECT max(version) AS v FROM philotes_migrations',
  );
  return Number(result.rows[0]?.v ?? 0);
}

/** The checkpoints of `sourceIds`, by source (none while the buffer has no tables). */
export async function readCheckpoints(
  client: pg.Client,
  sourceIds: readonly string[],
): Promise<Map<string, CheckpointRow>> {
  if (!(await tablesPresent(client, ['cdc_checkpoints'])).has('cdc_checkpoints')) return new Map();
  const rows = await client.query<CheckpointRow>(
    `SELECT source_id, lsn, confirmed_lsn::text, committed_at, metadata, to_jsonb(c) AS row
       FROM cdc_checkpoints c WHERE source_id = ANY($1)`,
    [sourceIds],
  );
  return new Map(rows.rows.map((r) => [r.source_id, r]));
}

/** Each source's latest snapshot (none before buffer schema 5). */
export async function readLatestSnapshots(
  client: pg.Client,
  sourceIds: readonly string[],
): Promise<Map<string, StoredSnapshot>> {
  if (!(await tablesPresent(client, ['cdc_snapshots'])).has('cdc_snapshots')) return new Map();
  const latest = await client.query<{
    source_id: string;
    id: string;
    reason: string;
    state: string;
    started_at: Date;
    finished_at: Date | null;
    rows: string;
    tables: Record<string, number> | null;
  }>(
    `SELECT DISTINCT ON (s.source_id) s.source_id, s.id, s.reason, s.state, s.started_at,
            s.finished_at, s.rows,
            (SELECT jsonb_object_agg(state, n) FROM (
               SELECT t.state, count(*)::int AS n FROM cdc_snapshot_tables t
                WHERE t.snapshot_id = s.id GROUP BY t.state) c) AS tables
       FROM cdc_snapshots s WHERE s.source_id = ANY($1)
      ORDER BY s.source_id, s.id DESC`,
    [sourceIds],
  );
  return new Map(
    latest.rows.map((r) => [
      r.source_id,
      {
        id: Number(r.id),
        reason: r.reason,
        state: r.state,
        startedAt: r.started_at.toISOString(),
        finishedAt: r.finished_at?.toISOString() ?? null,
        rows: Number(r.rows),
        tables: r.tables ?? {},
      },
    ]),
  );
}
