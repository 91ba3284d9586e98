/**
 * cdc_source_status: what each running Philotes process says about its sources (migration 7),
 * so that `status` and `check`, which run elsewhere, can say that a source is failing and why.
 * A row is the process's own (source, reporter = host:pid); it is written best-effort, never in a
 * capture transaction, and deleted at a clean stop.
 */
import type pg from 'pg';

export interface SourceStatusRow {
  readonly sourceId: string;
  readonly reporter: string;
  readonly state: string;
  readonly since: Date;
  readonly lastError: string | null;
  readonly lastErrorCode: string | null;
  readonly lastErrorAt: Date | null;
}

/** How often a running process refreshes its rows; twice this and a row is a process gone quiet. */
export const STATUS_REFRESH_MS = 30_000;

export async function recordSourceStatus(pool: pg.Pool, row: SourceStatusRow): Promise<void> {
  await pool.query(
    `INSERT INTO cdc_source_status
       (source_id, reporter, state, since, last_error, last_error_code, last_error_at, reported_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, now())
     ON CONFLICT (source_id, reporter) DO UPDATE SET
       state = EXCLUDED.state, since = EXCLUDED.since, last_error = EXCLUDED.last_error,
       last_error_code = EXCLUDED.last_error_code, last_error_at = EXCLUDED.last_error_at,
       reported_at = now()`,
    [
      row.sourceId,
      row.reporter,
      row.state,
      row.since,
      row.lastError,
      row.lastErrorCode,
      row.lastErrorAt,
    ],
  );
}

export async function removeSourceStatus(
  pool: pg.Pool,
  sourceId: string,
  reporter: string,
): Promise<void> {
  await pool.query('DELETE FROM cdc_source_status WHERE source_id = $1 AND reporter = $2', [
    sourceId,
    reporter,
  ]);
}

/** A source as the processes that run it report it, newest first. */
export interface ReportedStatus {
  readonly reporter: string;
  readonly state: string;
  readonly since: string;
  readonly lastError: string | null;
  readonly lastErrorCode: string | null;
  readonly lastErrorAt: string | null;
  /** Seconds since the process last wrote it: past 2 × STATUS_REFRESH_MS it has gone quiet. */
  readonly ageSeconds: number;
}

export async function readSourceStatus(
  client: pg.Client,
  sourceId: string,
): Promise<ReportedStatus[]> {
  const exists = await client.query(`SELECT to_regclass('cdc_source_status') IS NOT NULL AS ok`);
  if (exists.rows[0]?.ok !== true) return [];
  const result = await client.query<ReportedStatus>(
    `SELECT reporter, state, since::text AS since, last_error AS "lastError",
            last_error_code AS "lastErrorCode", last_error_at::text AS "lastErrorAt",
            extract(epoch FROM now() - reported_at)::int AS "ageSeconds"
       FROM cdc_source_status WHERE source_id = $1 ORDER BY reported_at DESC`,
    [sourceId],
  );
  return result.rows;
}

/** Whether a reported status is recent enough to speak for a running process. */
export function isCurrent(status: ReportedStatus): boolean {
  return status.ageSeconds * 1000 <= 2 * STATUS_REFRESH_MS;
}
