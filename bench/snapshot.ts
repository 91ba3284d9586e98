/**
 * The initial snapshot of a 2M-row table into the buffer, durable (the snapshot's record says
 * done), against what a user would otherwise do — `pg_dump --data-only -t table | psql` into a
 * scratch database of the buffer server — same run, same servers. Goal: at least 0.5 × its rows/s.
 * Reports Philotes' peak RSS.
 *
 *   npm run bench -- snapshot     # PHILOTES_BENCH_SNAPSHOT_ROWS=500000 for a shorter run
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { startCluster } from '../test/support/cluster.js';
import { waitFor } from '../test/support/poll.js';
import { binDir } from './pg-tools.js';
import { spawnPhilotes } from './philotes-process.js';
import { cpuSeconds, peakRssMb } from './proc-stats.js';
import { reapedChildCpuSeconds, waitForBackendsGone } from './cluster-cpu.js';

export const SNAPSHOT_ROWS = Number(process.env['PHILOTES_BENCH_SNAPSHOT_ROWS'] ?? 2_000_000);

const TABLE = `CREATE TABLE accounts (
  id bigint PRIMARY KEY,
  owner text NOT NULL,
  balance numeric(14, 2) NOT NULL,
  opened date NOT NULL,
  updated timestamptz NOT NULL,
  tags text[],
  active boolean NOT NULL
)`;

export interface SnapshotBench {
  rows: number;
  philotesSeconds: number;
  philotesRowsPerSecond: number;
  philotesPeakRssMb: number;
  philotesCpuSeconds: number;
  chunks: number;
  pgDumpSeconds: number;
  pgDumpRowsPerSecond: number;
  /** Philotes' rows/s over pg_dump | psql's. */
  ratio: number;
  /** CPU seconds of the source's and the buffer's backends during Philotes' snapshot. */
  sourceBackendCpuSeconds: number;
  bufferBackendCpuSeconds: number;
}

function shell(command: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', ['-o', 'pipefail', '-c', command], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) =>
      code === 0 ? resolve() : reject(new Error(`${command} failed (${code}): ${stderr}`)),
    );
  });
}

export async function runSnapshotBench(): Promise<SnapshotBench> {
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  try {
    await Promise.all([
      source.createDatabase('app'),
      buffer.createDatabase('buffer'),
      buffer.createDatabase('scratch'),
    ]);
    await source.query(TABLE, [], 'app');
    await source.query(
      `INSERT INTO accounts
       SELECT g, 'owner ' || g, (g % 100000) / 7.0, date '2020-01-01' + (g % 1500),
              timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
              ARRAY['tier' || (g % 5), 'region' || (g % 11)], g % 3 <> 0
         FROM generate_series(1, $1::int) g`,
      [SNAPSHOT_ROWS],
      'app',
    );
    await source.query('VACUUM ANALYZE accounts', [], 'app');
    await buffer.query(TABLE, [], 'scratch');

    // What a user would otherwise do: a dump of the table's rows, loaded into the buffer server.
    const bin = binDir();
    const dumpStarted = performance.now();
    await shell(
      `${join(bin, 'pg_dump')} --data-only -t public.accounts '${source.url('app')}' | ${join(bin, 'psql')} -q -v ON_ERROR_STOP=1 '${buffer.url('scratch')}'`,
    );
    const pgDumpSeconds = (performance.now() - dumpStarted) / 1000;
    // Outside the timing: otherwise autovacuum of the 2M new rows would run during Philotes'
    // phase, on the same two cores.
    await buffer.query('VACUUM ANALYZE accounts', [], 'scratch');

    await waitForBackendsGone(source, 'app');
    await waitForBackendsGone(buffer, 'scratch');
    const sourceCpu0 = reapedChildCpuSeconds(source);
    const bufferCpu0 = reapedChildCpuSeconds(buffer);
    const started = performance.now();
    const child = spawnPhilotes(source, buffer, { PHILOTES_CDC_SNAPSHOT: 'initial' });
    let result: Omit<
      SnapshotBench,
      'ratio' | 'sourceBackendCpuSeconds' | 'bufferBackendCpuSeconds'
    >;
    try {
      await waitFor(
        async () => {
          const rows = await buffer
            .query<{ state: string }>(`SELECT state FROM cdc_snapshots`, [], 'buffer')
            .catch(() => []);
          return rows[0]?.state === 'done';
        },
        { what: 'the snapshot to finish', timeoutMs: 3_600_000, intervalMs: 50 },
      );
      const philotesSeconds = (performance.now() - started) / 1000;
      const peak = peakRssMb(child.pid!);
      const cpu = cpuSeconds(child.pid!).own;
      const [stored] = await buffer.query<{ n: number; chunks: number }>(
        `SELECT (SELECT count(*)::int FROM cdc_events WHERE operation = 'SNAPSHOT') AS n,
                (SELECT sum(chunks)::int FROM cdc_snapshot_tables) AS chunks`,
        [],
        'buffer',
      );
      if (stored!.n !== SNAPSHOT_ROWS)
        throw new Error(`expected ${SNAPSHOT_ROWS} SNAPSHOT events, found ${stored!.n}`);
      result = {
        rows: SNAPSHOT_ROWS,
        philotesSeconds: round(philotesSeconds),
        philotesRowsPerSecond: Math.round(SNAPSHOT_ROWS / philotesSeconds),
        philotesPeakRssMb: peak,
        philotesCpuSeconds: round(cpu),
        chunks: stored!.chunks,
        pgDumpSeconds: round(pgDumpSeconds),
        pgDumpRowsPerSecond: Math.round(SNAPSHOT_ROWS / pgDumpSeconds),
      };
    } finally {
      // A clean stop (profiles, when PHILOTES_BENCH_NODE_FLAGS asks for them, are written then).
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(timer);
    }
    // Philotes' connections have ended: their backends' CPU is reaped by the postmasters now.
    await waitForBackendsGone(source, 'app');
    await waitForBackendsGone(buffer, 'buffer');
    return {
      ...result,
      ratio: round(result.philotesRowsPerSecond / result.pgDumpRowsPerSecond),
      sourceBackendCpuSeconds: round(reapedChildCpuSeconds(source) - sourceCpu0),
      bufferBackendCpuSeconds: round(reapedChildCpuSeconds(buffer) - bufferCpu0),
    };
  } finally {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
  }
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
