/**
 * Consuming the buffer (README, "Consuming the buffer"), one Philotes capturing one source and one
 * consume() member of a group whose handler does nothing but count (its transaction unused):
 *
 * - read throughput: a backlog of events already stored, read and committed by the member;
 * - wake-up: on an idle system, one row at a time (200 ms apart), source COMMIT returned to the
 *   handler seeing it (the capture's own latency included): p50, p99;
 * - end-to-end at 1k tx/s: single-row transactions paced at 1000/s for 10 s, the event's source
 *   commit time to the handler: p50, p99;
 * - the capture's throughput draining one backlog (small transactions of 4 rows) from slots made
 *   before it, each run into a buffer database of its own, alternating: wake-ups off; wake-ups on;
 *   wake-ups on with a group member reading along (LISTEN) and the retention keeper's rounds
 *   (partitions of 10 s, retention 1 s). Timed from the first event stored to the last. The ratios
 *   say what wake-ups and consuming cost the capture.
 *
 *   npm run bench -- consume
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { consume } from '../src/index.js';
import { createLogger } from '../src/common/logger.js';
import { startCluster, type Cluster } from '../test/support/cluster.js';
import { waitFor } from '../test/support/poll.js';
import { spawnPhilotes } from './philotes-process.js';
import { SCENARIOS, buildBacklog } from './backlog.js';

const BACKLOG = 200_000;
const CAPTURE_ROUNDS = 3;
type CaptureVariant = 'off' | 'on' | 'consumed';

/** Rows per second the capture drained, per variant, one figure per round. */
export interface CaptureResult {
  rows: number;
  rowsPerSecond: Record<CaptureVariant, number[]>;
  /** Median of the rounds, wake-ups on against off, and consumed against off. */
  onVsOff: number;
  consumedVsOff: number;
  /** Events the reading member took during the consumed runs, and partitions retention dropped (the keeper's rounds run every 2.5 s; a run is too short for a partition of 10 s to pass retention, usually). */
  consumedEvents: number;
  partitionsDropped: number;
}

export interface ConsumeResult {
  scenario: 'consume';
  backlogEvents: number;
  readEventsPerSecond: number;
  wakeupP50Ms: number;
  wakeupP99Ms: number;
  e2eTransactions: number;
  e2eP50Ms: number;
  e2eP99Ms: number;
  capture: CaptureResult;
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return (
    Math.round(sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! * 10) /
    10
  );
}

export async function runConsume(): Promise<ConsumeResult> {
  const [source, buffer] = await Promise.all([
    startCluster({ settings: { synchronous_commit: 'on' } }),
    startCluster(),
  ]);
  await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
  await source.query('CREATE TABLE bench_rows (id bigserial PRIMARY KEY, v int)', [], 'app');
  const philotes = spawnPhilotes(source, buffer);
  const writer = new pg.Client({ connectionString: source.url('app') });
  await writer.connect();
  let measured: Omit<ConsumeResult, 'capture'>;
  try {
    await waitFor(
      async () =>
        (await buffer.query('SELECT 1 FROM cdc_checkpoints', [], 'buffer').catch(() => [])).length >
        0,
      { what: 'the capture to start', timeoutMs: 60_000 },
    );
    for (let i = 0; i < BACKLOG / 1000; i++)
      await writer.query('INSERT INTO bench_rows (v) SELECT g FROM generate_series(1, 1000) g');
    await waitFor(
      async () =>
        (
          await buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'bench'`,
            [],
            'buffer',
          )
        )[0]!.n >= BACKLOG,
      { what: 'the backlog to be stored', timeoutMs: 300_000 },
    );

    // Read throughput.
    let seen = 0;
    const arrived = new Map<number, number>();
    const lags: number[] = [];
    let measuring = false;
    const started = performance.now();
    const member = await consume({
      buffer: buffer.url('buffer'),
      group: 'bench',
      logger: createLogger('warn', {}, 2),
      handler: async (batch) => {
        const now = Date.now();
        for (const r of batch.records) {
          if (r.kind !== 'event') continue;
          seen++;
          const id = Number(r.after?.['id']);
          if (arrived.has(id)) arrived.set(id, performance.now());
          if (measuring) lags.push(now - Date.parse(r.committedAt));
        }
      },
    });
    await waitFor(() => seen >= BACKLOG, {
      what: 'the backlog to be read',
      timeoutMs: 600_000,
      intervalMs: 20,
    });
    const readSeconds = (performance.now() - started) / 1000;

    // Wake-up, one row at a time.
    const wakeups: number[] = [];
    for (let i = 0; i < 100; i++) {
      const r = await writer.query<{ id: string }>(
        'INSERT INTO bench_rows (v) VALUES (1) RETURNING id',
      );
      const committed = performance.now();
      const id = Number(r.rows[0]!.id);
      arrived.set(id, NaN);
      await waitFor(() => !Number.isNaN(arrived.get(id)), {
        what: `row ${id}`,
        timeoutMs: 30_000,
        intervalMs: 1,
      });
      wakeups.push(arrived.get(id)! - committed);
      arrived.delete(id);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }

    // End to end at 1k tx/s, four writers of 250 tx/s each.
    measuring = true;
    const writers = await Promise.all(
      [0, 1, 2, 3].map(async () => {
        const c = new pg.Client({ connectionString: source.url('app') });
        await c.connect();
        return c;
      }),
    );
    const end = performance.now() + 10_000;
    let transactions = 0;
    await Promise.all(
      writers.map(async (c, w) => {
        let next = performance.now() + w;
        while (performance.now() < end) {
          await c.query('INSERT INTO bench_rows (v) VALUES (2)');
          transactions++;
          next += 4;
          const wait = next - performance.now();
          if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        }
        await c.end();
      }),
    );
    await waitFor(() => lags.length >= transactions, {
      what: 'every paced row',
      timeoutMs: 60_000,
      intervalMs: 20,
    });
    await member.stop();
    measured = {
      scenario: 'consume',
      backlogEvents: BACKLOG,
      readEventsPerSecond: Math.round(BACKLOG / readSeconds),
      wakeupP50Ms: percentile(wakeups, 50),
      wakeupP99Ms: percentile(wakeups, 99),
      e2eTransactions: transactions,
      e2eP50Ms: percentile(lags, 50),
      e2eP99Ms: percentile(lags, 99),
    };
  } catch (error) {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
    throw error;
  } finally {
    await writer.end().catch(() => undefined);
    philotes.kill('SIGTERM');
    await new Promise((resolve) => philotes.once('exit', resolve));
  }
  // With the first Philotes gone: nothing else decodes the capture runs' WAL meanwhile.
  try {
    return { ...measured, capture: await runCapture(source, buffer) };
  } finally {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
  }
}

/**
 * One backlog, drained again and again from slots made before it (one per run), each run into a
 * buffer database of its own: the variants see the same WAL, alternating so that drift in the
 * machine's speed falls on all of them.
 */
async function runCapture(source: Cluster, buffer: Cluster): Promise<CaptureResult> {
  const variants: CaptureVariant[] = ['off', 'on', 'consumed'];
  const runs = Array.from({ length: CAPTURE_ROUNDS }, () => variants).flat();
  // The drain's small backlog, in a database of its own, behind a slot per run.
  const small = SCENARIOS.find((s) => s.name === 'small')!;
  await source.createDatabase('capture');
  await source.query(
    `${small.ddl}; CREATE TABLE bench_marker (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
     CREATE PUBLICATION philotes_pub FOR ALL TABLES`,
    [],
    'capture',
  );
  for (let i = 0; i < runs.length; i++)
    await source.query(
      `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`,
      [`capture_${i}`],
      'capture',
    );
  const work = mkdtempSync(join(tmpdir(), 'philotes-bench-capture-'));
  let marker: string;
  try {
    marker = (await buildBacklog(source, small, work, 'capture')).target;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  const rows = small.clients * small.transactions * small.rowsPerTransaction;
  const rowsPerSecond: Record<CaptureVariant, number[]> = { off: [], on: [], consumed: [] };
  let consumedEvents = 0;
  let partitionsDropped = 0;
  for (const [i, variant] of runs.entries()) {
    const db = `capture_${i}`;
    await buffer.createDatabase(db);
    let member: Awaited<ReturnType<typeof consume>> | null = null;
    const child = spawnPhilotes(source, buffer, {
      PHILOTES_CDC_SOURCE_URL: source.url('capture'),
      PHILOTES_BUFFER_URL: buffer.url(db),
      PHILOTES_CDC_REPLICATION_SLOT: `capture_${i}`,
      PHILOTES_WAKEUPS: variant === 'off' ? 'off' : 'on',
      ...(variant === 'consumed'
        ? {
            PHILOTES_PARTITION_INTERVAL: '10s',
            PHILOTES_RETENTION: '1s',
            PHILOTES_RETENTION_MAX: '0',
          }
        : {}),
    });
    const exited = new Promise((resolve) => child.once('exit', resolve));
    try {
      if (variant === 'consumed') {
        // Begun before anything is stored: it holds every partition until it has read it.
        await waitFor(
          async () =>
            (
              await buffer.query(
                `SELECT to_regclass('cdc_consumer_offsets') IS NOT NULL AS ok`,
                [],
                db,
              )
            )[0]?.['ok'] === true,
          { what: 'the buffer schema', timeoutMs: 60_000, intervalMs: 20 },
        );
        member = await consume({
          buffer: buffer.url(db),
          group: 'reader',
          sources: ['bench'],
          logger: createLogger('warn', {}, 2),
          handler: async (batch) => {
            consumedEvents += batch.records.length;
          },
        });
      }
      // From the first event stored, not from the process start: a new buffer database's
      // migrations and a process's start-up are not the throughput asked about.
      await waitFor(
        async () =>
          (await buffer.query('SELECT 1 FROM cdc_events LIMIT 1', [], db).catch(() => [])).length >
          0,
        {
          what: `run ${i} (${variant}) to store its first event`,
          timeoutMs: 120_000,
          intervalMs: 5,
        },
      );
      const started = performance.now();
      await waitFor(
        async () =>
          (
            await buffer
              .query<{ done: boolean }>(
                `SELECT lsn::pg_lsn > $1::pg_lsn AS done FROM cdc_checkpoints WHERE source_id = 'bench'`,
                [marker],
                db,
              )
              .catch(() => [])
          )[0]?.done === true,
        { what: `run ${i} (${variant}) to drain the backlog`, timeoutMs: 600_000, intervalMs: 20 },
      );
      rowsPerSecond[variant].push(Math.round(rows / ((performance.now() - started) / 1000)));
      if (variant === 'consumed') {
        const [dropped] = await buffer.query<{ n: number }>(
          'SELECT count(*)::int AS n FROM cdc_partitions WHERE dropped_at IS NOT NULL',
          [],
          db,
        );
        partitionsDropped += dropped!.n;
      }
    } finally {
      await member?.stop();
      child.kill('SIGTERM');
      await exited;
    }
    await source.query('SELECT pg_drop_replication_slot($1)', [`capture_${i}`], 'capture');
  }
  const off = percentile(rowsPerSecond.off, 50);
  return {
    rows,
    rowsPerSecond,
    onVsOff: Math.round((percentile(rowsPerSecond.on, 50) / off) * 100) / 100,
    consumedVsOff: Math.round((percentile(rowsPerSecond.consumed, 50) / off) * 100) / 100,
    consumedEvents,
    partitionsDropped,
  };
}
