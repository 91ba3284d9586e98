/** The drain scenarios' write backlogs (drain.ts), shared with the consume bench. */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Cluster } from '../test/support/cluster.js';
import { pgbench } from './pg-tools.js';

export interface Scenario {
  name: string;
  description: string;
  ddl: string;
  /** A pgbench script; run with `clients` clients for `transactions` transactions each. */
  script: string;
  clients: number;
  transactions: number;
  rowsPerTransaction: number;
}

export const SCENARIOS: Scenario[] = [
  {
    name: 'small',
    description: '100k small transactions of 4 rows from 4 clients',
    ddl: `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, k int, v int, note text, created timestamptz DEFAULT now())`,
    script: `\\set g random(1, 1000000)\nINSERT INTO bench_rows (k, v, note) SELECT :g + i, i, 'row ' || i FROM generate_series(1, 4) i;\n`,
    clients: 4,
    transactions: 25_000,
    rowsPerTransaction: 4,
  },
  {
    name: 'bulk',
    description: '8 bulk transactions of 50k rows from 2 clients',
    ddl: `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, k int, v int, note text, created timestamptz DEFAULT now())`,
    script: `INSERT INTO bench_rows (k, v, note) SELECT i, i, 'row ' || i FROM generate_series(1, 50000) i;\n`,
    clients: 2,
    transactions: 4,
    rowsPerTransaction: 50_000,
  },
  {
    name: 'wide',
    description: '50k transactions of 2 wide rows (24 columns, ~1 KB) from 4 clients',
    ddl: `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, ${Array.from({ length: 8 }, (_, i) => `t${i} text, n${i} numeric, ts${i} timestamptz`).join(', ')})`,
    script: `INSERT INTO bench_rows (${Array.from({ length: 8 }, (_, i) => `t${i}, n${i}, ts${i}`).join(', ')}) SELECT ${Array.from({ length: 8 }, (_, i) => `repeat(md5(i::text), 3), i * ${i + 1}.25, now()`).join(', ')} FROM generate_series(1, 2) i;\n`,
    clients: 4,
    transactions: 12_500,
    rowsPerTransaction: 2,
  },
];

/**
 * Writes the scenario's backlog with pgbench into `database` (its tables made already, and a
 * bench_marker table), then one marker transaction: `target` is a position taken just before the
 * marker's commit, so once a checkpoint passes it everything before is stored.
 */
export async function buildBacklog(
  source: Cluster,
  s: Scenario,
  work: string,
  database = 'app',
): Promise<{ target: string; walBytes: number }> {
  const [start] = await source.query<{ lsn: string }>(
    'SELECT pg_current_wal_lsn()::text AS lsn',
    [],
    database,
  );
  const scriptFile = join(work, `${s.name}.sql`);
  writeFileSync(scriptFile, s.script);
  await pgbench(
    source,
    [
      '-n',
      '-c',
      String(s.clients),
      '-j',
      String(Math.min(s.clients, 2)),
      '-t',
      String(s.transactions),
      '-f',
      scriptFile,
    ],
    database,
  );
  // A marker transaction after the backlog: once the checkpoint passes the position taken just
  // before its commit, everything before it is stored.
  const rows = await source.query<{ lsn: string }>(
    `INSERT INTO bench_marker DEFAULT VALUES RETURNING pg_current_wal_insert_lsn()::text AS lsn`,
    [],
    database,
  );
  const [end] = await source.query<{ lsn: string; bytes: string }>(
    `SELECT pg_current_wal_lsn()::text AS lsn, pg_wal_lsn_diff(pg_current_wal_lsn(), $1)::text AS bytes`,
    [start!.lsn],
    database,
  );
  return { target: rows[0]!.lsn, walBytes: Number(end!.bytes) };
}
