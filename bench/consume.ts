/**
 * Consuming the buffer (README, "Consuming the buffer"), one Philotes capturing one source and one
 * consume() member of a group whose handler does nothing but count (its transaction unused):
 *
 * - read throughput: a backlog of events already stored, read and committed by the member;
 * - wake-up: on an idle system, one row at a time (200 ms apart), source COMMIT returned to the
 *   handler seeing it (the capture's own latency included): p50, p99;
 * - end-to-end at 1k tx/s: single-row transactions paced at 1000/s for 10 s, the event's source
 *   commit time to the handler: p50, p99.
 *
 *   npm run bench -- consume
 */
import pg from 'pg';
import { consume } from '../src/index.js';
import { createLogger } from '../src/common/logger.js';
import { startCluster } from '../test/support/cluster.js';
import { waitFor } from '../test/support/poll.js';
import { spawnPhilotes } from './philotes-process.js';

const BACKLOG = 200_000;

export interface ConsumeResult {
  scenario: 'consume';
  backlogEvents: number;
  readEventsPerSecond: number;
  wakeupP50Ms: number;
  wakeupP99Ms: number;
  e2eTransactions: number;
  e2eP50Ms: number;
  e2eP99Ms: number;
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
    return {
      scenario: 'consume',
      backlogEvents: BACKLOG,
      readEventsPerSecond: Math.round(BACKLOG / readSeconds),
      wakeupP50Ms: percentile(wakeups, 50),
      wakeupP99Ms: percentile(wakeups, 99),
      e2eTransactions: transactions,
      e2eP50Ms: percentile(lags, 50),
      e2eP99Ms: percentile(lags, 99),
    };
  } finally {
    await writer.end().catch(() => undefined);
    philotes.kill('SIGTERM');
    await new Promise((resolve) => philotes.once('exit', resolve));
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
  }
}
