/**
 * What the demo shows at the end: waits until the buffer holds every committed change and the
 * slot has caught up, then reads back events, checkpoint, slot, metrics and readiness.
 */
import type pg from 'pg';
import type { PhilotesProcess } from '../test/support/philotes.js';
import { seconds, shortenJson, type Output } from './console.js';
import { DemoError, HOST, SLOT, SOURCE_ID, type DemoSession } from './session.js';
import { LOAD_CLIENTS, OPERATIONS, type Load, type Tally } from './shop-load.js';

export async function fetchText(url: string): Promise<{ status: number; body: string }> {
  const response = await fetch(url, { signal: AbortSignal.timeout(5_000) });
  return { status: response.status, body: await response.text() };
}

export interface Stored {
  /** `OPERATION schema.table` → events in cdc_events. */
  readonly counts: Map<string, number>;
  readonly checkpoint: string;
}

/** Polls until the buffer holds exactly what the source committed and the checkpoint is past it. */
export async function waitForBuffer(
  session: DemoSession,
  buffer: pg.Client,
  tally: Tally,
): Promise<Stored> {
  let counts = new Map<string, number>();
  const progress = () =>
    'stored/expected so far: ' +
    [...tally.counts].map(([key, n]) => `${key} ${counts.get(key) ?? 0}/${n}`).join(', ');
  const checkpoint = await session.until(
    'the buffer to hold every committed change',
    30_000,
    async () => {
      const rows = await buffer.query<{ operation: string; table_name: string; n: number }>(
        `SELECT operation, schema_name || '.' || table_name AS table_name, count(*)::int AS n
           FROM cdc_events WHERE source_id = $1 GROUP BY 1, 2`,
        [SOURCE_ID],
      );
      counts = new Map(rows.rows.map((r) => [`${r.operation} ${r.table_name}`, r.n]));
      for (const [key, n] of counts) {
        if (n > (tally.counts.get(key) ?? 0)) {
          throw new DemoError(
            `the buffer holds more events than the source committed: ${progress()}`,
          );
        }
      }
      for (const [key, n] of tally.counts) if (counts.get(key) !== n) return undefined;
      // The checkpoint is the end of the last stored commit record, an event's lsn the start of
      // its transaction's commit record: past the highest one, the last transaction is in.
      const cp = await buffer.query<{ lsn: string; caught_up: boolean }>(
        `SELECT lsn, lsn::pg_lsn > (SELECT max(lsn) FROM cdc_events WHERE source_id = $1) AS caught_up
           FROM cdc_checkpoints WHERE source_id = $1`,
        [SOURCE_ID],
      );
      return cp.rows[0]?.caught_up ? cp.rows[0].lsn : undefined;
    },
    progress,
  );
  return { counts, checkpoint };
}

export async function waitForSlot(
  session: DemoSession,
  source: pg.Client,
  checkpoint: string,
): Promise<void> {
  await session.until(
    "the slot's confirmed_flush_lsn to reach the checkpoint",
    15_000,
    async () => {
      const r = await source.query<{ ok: boolean }>(
        'SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = $1',
        [SLOT, checkpoint],
      );
      return r.rows[0]?.ok ? true : undefined;
    },
  );
}

interface SampleRow {
  lsn: string;
  seq: number;
  xid: string;
  committed_at: string;
  operation: string;
  table_name: string;
  before: string | null;
  after: string | null;
  primary_key: string[];
  unchanged_columns: string[] | null;
}

const SAMPLES: ReadonlyArray<readonly [label: string, where: string]> = [
  [
    'a row the shop had before Philotes started, copied by the initial snapshot (after only)',
    `operation = 'SNAPSHOT' AND table_name = 'orders'`,
  ],
  [
    'numeric and int8 as strings, jsonb as stored, text[] as an array, bytea as hex, µs timestamps',
    `operation = 'INSERT' AND table_name = 'customers'`,
  ],
  [
    'the long TOASTed notes did not change: left out of "after" and named in unchanged_columns',
    `operation = 'UPDATE' AND table_name = 'customers' AND unchanged_columns IS NOT NULL`,
  ],
  [
    'REPLICA IDENTITY FULL: "before" is the whole old row',
    `operation = 'UPDATE' AND table_name = 'orders'`,
  ],
  ['an order cancelled', `operation = 'DELETE' AND table_name = 'orders'`],
  [
    'default replica identity: "before" holds the key only',
    `operation = 'DELETE' AND table_name = 'customers'`,
  ],
  ['one event per truncated table', `operation = 'TRUNCATE'`],
];

export interface Report {
  samples: Array<[string, SampleRow]>;
  checkpointRow: Record<string, string | null> | undefined;
  transactions: number;
  schemaVersions: Array<{ t: string; v: number }>;
  slot: Record<string, string | boolean> | undefined;
  metrics: { status: number; body: string };
  health: { status: number; body: string };
}

export async function collectReport(
  source: pg.Client,
  buffer: pg.Client,
  metricsPort: number,
): Promise<Report> {
  const samples: Report['samples'] = [];
  for (const [label, where] of SAMPLES) {
    const r = await buffer.query<SampleRow>(
      `SELECT lsn::text, seq, xid::text, operation, schema_name || '.' || table_name AS table_name,
              to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS committed_at,
              before::text, after::text, primary_key, unchanged_columns
         FROM cdc_events WHERE source_id = $1 AND ${where} ORDER BY cdc_events.lsn, seq LIMIT 1`,
      [SOURCE_ID],
    );
    if (r.rows[0]) samples.push([label, r.rows[0]]);
  }
  const one = async <T extends pg.QueryResultRow>(
    client: pg.Client,
    sql: string,
    params: unknown[],
  ): Promise<T | undefined> => (await client.query<T>(sql, params)).rows[0];
  return {
    samples,
    checkpointRow: await one(
      buffer,
      `SELECT source_id, lsn, transaction_id::text, committed_at::text, metadata::text
         FROM cdc_checkpoints WHERE source_id = $1`,
      [SOURCE_ID],
    ),
    transactions:
      (
        await one<{ n: number }>(
          buffer,
          // The snapshot's rows sit at positions of their own (its chunks' watermarks): the
          // source's transactions are the commit positions of everything else.
          `SELECT count(DISTINCT lsn)::int AS n FROM cdc_events
            WHERE source_id = $1 AND operation <> 'SNAPSHOT'`,
          [SOURCE_ID],
        )
      )?.n ?? 0,
    schemaVersions: (
      await buffer.query<{ t: string; v: number }>(
        `SELECT schema_name || '.' || table_name AS t, max(version) AS v FROM cdc_schema_history
          WHERE source_id = $1 GROUP BY 1 ORDER BY 1`,
        [SOURCE_ID],
      )
    ).rows,
    slot: await one(
      source,
      `SELECT slot_name, plugin, active, confirmed_flush_lsn::text, pg_current_wal_lsn()::text AS wal_lsn,
              pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained
         FROM pg_replication_slots WHERE slot_name = $1`,
      [SLOT],
    ),
    metrics: await fetchText(`http://${HOST}:${metricsPort}/metrics`),
    health: await fetchText(`http://${HOST}:${metricsPort}/readyz`),
  };
}

const METRICS_SHOWN =
  /^philotes_(events_total|transactions_total|buffer_commits_total|commit_lag_seconds_(count|sum)|checkpoint_lsn_bytes|confirmed_lsn_bytes|replication_lag_bytes|reader_up)\b/;

export function printReport(
  out: Output,
  load: Load,
  stored: Stored,
  catchUpMs: number,
  report: Report,
  philotes: PhilotesProcess,
  metricsPort: number,
): void {
  out.heading(`What landed in demo_buffer.cdc_events (source "${SOURCE_ID}")`);
  const copied = load.tally.byOperation('SNAPSHOT');
  out.say(
    `  The initial snapshot copied the ${copied} rows the shop had before Philotes started; then ` +
      `the source committed ${load.tally.total - copied} changes in ${load.committed} transactions ` +
      `from ${LOAD_CLIENTS} clients over ${seconds(load.ms)}` +
      (load.rolledBack > 0 ? ` (${load.rolledBack} more rolled back on conflicts).` : '.'),
  );
  out.say(
    `  The buffer held all of them ${seconds(catchUpMs)} after the load ended, ` +
      `in ${report.transactions} transactions (distinct commit LSNs of the changes) ` +
      `${report.transactions === load.committed ? '✓' : `✗ (the source committed ${load.committed})`}.`,
  );
  out.say();
  const storedTotal = (prefix: string) =>
    [...stored.counts].reduce((sum, [key, n]) => (key.startsWith(prefix) ? sum + n : sum), 0);
  const check = (a: number, b: number) => (a === b ? '✓' : '✗');
  const rows: string[][] = [['operation', 'committed on source', 'stored in buffer', '']];
  for (const op of OPERATIONS) {
    const expected = load.tally.byOperation(op);
    const got = storedTotal(`${op} `);
    rows.push([op, String(expected), String(got), check(expected, got)]);
  }
  rows.push([
    'total',
    String(load.tally.total),
    String(storedTotal('')),
    check(load.tally.total, storedTotal('')),
  ]);
  out.table(rows);
  out.say();
  out.say(
    `  by table: ${[...load.tally.counts]
      .sort()
      .map(([key, n]) => `${key} ${n}`)
      .join(' · ')}`,
  );
  out.say(
    `  schema versions recorded: ${report.schemaVersions.map((r) => `${r.t} v${r.v}`).join(', ')}`,
  );

  out.heading('Sample events (before/after are the stored jsonb; long strings shortened here)');
  for (const [i, [label, row]] of report.samples.entries()) {
    if (i > 0) out.say();
    out.say(`  ${row.operation} ${row.table_name}: ${label}`);
    out.say(
      `    lsn ${row.lsn} · seq ${row.seq} · xid ${row.xid} · committed ${row.committed_at}` +
        ` · primary key {${row.primary_key.join(',')}}`,
    );
    if (row.operation !== 'TRUNCATE') {
      out.say(`    before: ${row.before === null ? 'null' : shortenJson(row.before)}`);
      out.say(`    after:  ${row.after === null ? 'null' : shortenJson(row.after)}`);
    }
    if (row.unchanged_columns)
      out.say(`    unchanged_columns: {${row.unchanged_columns.join(',')}}`);
  }

  out.heading('Checkpoint (demo_buffer.cdc_checkpoints): where Philotes resumes after any stop');
  const cp = Object.entries(report.checkpointRow ?? {});
  const keyWidth = Math.max(...cp.map(([k]) => k.length)) + 1;
  for (const [key, value] of cp) out.say(`  ${`${key}:`.padEnd(keyWidth)} ${value ?? 'null'}`);

  out.heading('Replication slot on demo_source (pg_replication_slots)');
  const slot = report.slot;
  if (slot) {
    out.say(`  ${slot['slot_name']} (${slot['plugin']}, active: ${slot['active']})`);
    out.say(
      `  confirmed_flush_lsn ${slot['confirmed_flush_lsn']} (buffer checkpoint ${stored.checkpoint})`,
    );
    out.say(
      `  server WAL at ${slot['wal_lsn']}; WAL the slot holds back now: ${slot['retained']} ` +
        `(/readyz's retainedWalBytes is the slot as Philotes last polled it, every 15 s: see slotPolledAt)`,
    );
  }

  const metricLines = report.metrics.body.split('\n').filter((l) => l && !l.startsWith('#'));
  out.heading(
    `Metrics (GET http://${HOST}:${metricsPort}/metrics: ${metricLines.length} samples, a few of them)`,
  );
  for (const line of metricLines) if (METRICS_SHOWN.test(line)) out.say(`  ${line}`);

  out.heading(`Readiness (GET http://${HOST}:${metricsPort}/readyz)`);
  out.say(`  HTTP ${report.health.status} ${report.health.body}`);

  out.heading(
    `Philotes logs: JSON on stdout (${philotes.logs().length} lines so far, kept in the temp dir); one line:`,
  );
  const ready = philotes.logs().find((e) => e['msg'] === 'reader ready') ?? philotes.logs()[0];
  if (ready) out.say(`  ${JSON.stringify(ready)}`);
  const lifecycle = new Set(
    philotes
      .logs()
      .filter((e) => e['level'] === 'info')
      .map((e) => String(e['msg'])),
  );
  out.say(`  lifecycle so far: ${[...lifecycle].join(' → ')}`);
}
