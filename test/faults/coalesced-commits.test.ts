/**
 * The process-wide buffer writer with 4 sources under load, from a configuration file: their
 * batches share buffer transactions; a source whose rows the buffer rejects stops alone while the
 * others keep storing; a buffer that falls behind makes every reader hold (memory bounded, no
 * walsender lost) and all carry on when it catches up. Each scenario ends with every source's
 * buffer contents replayed against its table: nothing lost, nothing twice.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startCluster, type Cluster } from '../support/cluster.js';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  connect,
  ITEMS_DDL,
  readEvents,
  startLoad,
  waitForSlotActive,
} from '../support/fixture.js';
import { outputTail, readMetric, sampleFor } from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const SOURCES = ['s0', 's1', 's2', 's3'];
const BATCH_MAX_BYTES = 64 * 1024;
const MAX_IN_FLIGHT_BATCHES = 4;

describe('coalesced buffer commits across sources', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  let philotes: PhilotesProcess | undefined;
  let metricsPort = 0;
  let loads: Array<ReturnType<typeof startLoad>> = [];

  beforeAll(async () => {
    // A short wal_sender_timeout: a reader that holds longer than this without answering
    // keepalives loses its walsender, which the hold test would see as a restart.
    [source, buffer] = await Promise.all([
      startCluster({ settings: { wal_sender_timeout: '3s' } }),
      startCluster(),
    ]);
    await buffer.createDatabase('buffer');
    for (const id of SOURCES) {
      await source.createDatabase(`db_${id}`);
      await source.query(ITEMS_DDL, [], `db_${id}`);
    }
    dir = mkdtempSync(join(tmpdir(), 'philotes-coalesce-'));
  });

  afterEach(async () => {
    await Promise.all(loads.map((l) => l.stop()));
    loads = [];
    await philotes?.kill9();
    philotes = undefined;
  });

  afterAll(async () => {
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function start(extra: string[], maxInFlightBatches = MAX_IN_FLIGHT_BATCHES): Promise<void> {
    const config = join(dir, `fleet-${Math.random().toString(36).slice(2, 8)}.yaml`);
    writeFileSync(
      config,
      [
        `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: buffer, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
        `defaults: { snapshot: never, checkpointInterval: 1s, batchMaxBytes: ${BATCH_MAX_BYTES}, maxInFlightBatches: ${maxInFlightBatches} }`,
        'restartMinDelay: 100ms',
        'restartMaxDelay: 1s',
        ...extra,
        'sources:',
        ...SOURCES.map(
          (id) =>
            `  - { id: ${id}, host: ${source.host}, port: ${source.port}, database: db_${id}, user: ${source.user}, passwordEnv: SOURCE_PASSWORD, slot: philotes_${id} }`,
        ),
      ].join('\n'),
    );
    metricsPort = await freePort();
    philotes = startPhilotes(
      {
        BUFFER_PASSWORD: buffer.password,
        SOURCE_PASSWORD: source.password,
        PHILOTES_METRICS_PORT: String(metricsPort),
        PHILOTES_METRICS_HOST: '127.0.0.1',
      },
      { args: ['--config', config] },
    );
    for (const id of SOURCES) await waitForSlotActive(source, `philotes_${id}`);
    loads = SOURCES.map((id) => startLoad(source, { clients: 1, database: `db_${id}` }));
  }

  /** A process-wide sample (no source label) from /metrics. */
  async function processMetric(sample: string): Promise<number> {
    const body = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const line = body.split('\n').find((l) => l.startsWith(`${sample} `));
    if (line === undefined) throw new Error(`${sample} is not on /metrics`);
    return Number(line.split(' ')[1]);
  }

  async function stored(): Promise<Map<string, number>> {
    const rows = await buffer.query<{ source_id: string; n: number }>(
      'SELECT source_id, count(*)::int AS n FROM cdc_events GROUP BY 1',
      [],
      'buffer',
    );
    return new Map(rows.map((r) => [r.source_id, r.n]));
  }

  async function sourcesGrow(ids: readonly string[], more: number): Promise<void> {
    const from = await stored();
    await waitFor(
      async () => {
        const now = await stored();
        return ids.every((id) => (now.get(id) ?? 0) >= (from.get(id) ?? 0) + more);
      },
      { what: `${ids.join(', ')} to store ${more} more events`, timeoutMs: 60_000 },
    );
  }

  /** Stops the load, waits until every source's checkpoint reaches its WAL, replays each. */
  async function expectEverySourceExact(): Promise<void> {
    await Promise.all(loads.map((l) => l.stop()));
    loads = [];
    // Caught up: every slot has confirmed the server's WAL position as of now.
    const [wal] = await source.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
    await waitFor(
      async () => {
        const rows = await source.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_replication_slots
            WHERE slot_name = ANY($1) AND confirmed_flush_lsn >= $2::pg_lsn`,
          [SOURCES.map((id) => `philotes_${id}`), wal!.lsn],
        );
        return rows[0]!.n === SOURCES.length;
      },
      { what: `every slot to confirm ${wal!.lsn}`, timeoutMs: 90_000 },
    );
    for (const id of SOURCES) {
      const rows = checkItemHistories(await readEvents(buffer, id, 'items'));
      await assertReplayMatchesSource(source, rows, `db_${id}`);
    }
    expect(philotes!.proc.exitCode, outputTail(philotes!)).toBeNull();
  }

  it('stores several sources in one buffer transaction, each source once and in order', async () => {
    await start([]);
    await sourcesGrow(SOURCES, 300);
    const transactions = await processMetric('philotes_buffer_transactions_total');
    const single = await processMetric('philotes_buffer_transaction_sources_bucket{le="1"}');
    let perSource = 0;
    for (const id of SOURCES)
      perSource += (await readMetric(metricsPort, 'philotes_buffer_commits_total', id)) ?? 0;
    // Each source counts the transactions that stored its batches; shared ones count once here.
    expect(transactions).toBeGreaterThan(0);
    expect(transactions - single, 'transactions holding more than one source').toBeGreaterThan(0);
    expect(perSource).toBeGreaterThan(transactions);
    await expectEverySourceExact();
  });

  it('a source whose rows the buffer rejects stops alone; the others keep storing, and it recovers once they are accepted', async () => {
    await start([]);
    await sourcesGrow(SOURCES, 50);
    // An operator's trigger on the buffer that rejects one source's rows: every group holding
    // s2's batches fails, and only s2 may pay for it.
    await buffer.query(
      `CREATE FUNCTION reject_s2() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NEW.source_id = 's2' THEN RAISE EXCEPTION 'rows of s2 rejected for the test'; END IF;
         RETURN NEW;
       END $$;
       CREATE TRIGGER reject_s2 BEFORE INSERT ON cdc_events FOR EACH ROW EXECUTE FUNCTION reject_s2();`,
      [],
      'buffer',
    );
    try {
      const others = SOURCES.filter((id) => id !== 's2');
      await waitFor(
        async () =>
          ((await readMetric(metricsPort, 'philotes_reader_restarts_total', 's2')) ?? 0) >= 2,
        { what: 's2 to restart twice on the rejected rows', timeoutMs: 60_000 },
      );
      const s2Before = (await stored()).get('s2') ?? 0;
      await sourcesGrow(others, 300);
      expect(
        (await stored()).get('s2') ?? 0,
        'nothing of s2 stored while its rows are rejected',
      ).toBe(s2Before);
      for (const id of others) {
        expect(
          (await readMetric(metricsPort, 'philotes_reader_restarts_total', id)) ?? 0,
          `${id} never restarted`,
        ).toBe(0);
      }
    } finally {
      // As an operator must: DROP TRIGGER on a partitioned table locks each partition before
      // the table itself, the opposite of the capture's COPY, and the two deadlock (seen in CI).
      // LOCK TABLE takes the table first, then its partitions.
      await buffer.query(
        `BEGIN; LOCK TABLE cdc_events IN ACCESS EXCLUSIVE MODE;
         DROP TRIGGER reject_s2 ON cdc_events; DROP FUNCTION reject_s2(); COMMIT`,
        [],
        'buffer',
      );
    }
    await sourcesGrow(['s2'], 100);
    await expectEverySourceExact();
  });

  it('a buffer that falls behind makes every reader hold, with bytes in flight bounded and no walsender lost, and all carry on', async () => {
    const cap = 1024 * 1024;
    // Readers may each have many batches in flight: only the cap across sources bounds them.
    await start([`maxBytesInFlight: ${cap}`, 'commitWriters: 1'], 64);
    await sourcesGrow(SOURCES, 50);
    const walsenders = await source.query<{ slot_name: string; active_pid: number }>(
      `SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name LIKE 'philotes_s%' ORDER BY 1`,
    );
    // Stores wait behind a lock the "operator" holds for longer than wal_sender_timeout.
    const locker: pg.Client = await connect(buffer, 'buffer');
    try {
      await locker.query('BEGIN');
      await locker.query('LOCK TABLE cdc_events IN SHARE MODE');
      await waitFor(async () => (await processMetric('philotes_readers_held')) === 1, {
        what: 'the readers to hold',
        timeoutMs: 30_000,
      });
      const inFlight = await sampleFor(6_000, 'bytes in flight', () =>
        processMetric('philotes_in_flight_bytes'),
      );
      console.log(`hold: peak ${Math.max(...inFlight)} bytes in flight, cap ${cap}`);
      // Each reader may have its in-flight batches on the way when the hold starts.
      const bound = cap + SOURCES.length * MAX_IN_FLIGHT_BATCHES * (BATCH_MAX_BYTES + 16 * 1024);
      expect(Math.max(...inFlight)).toBeLessThanOrEqual(bound);
      expect(await processMetric('philotes_readers_held')).toBe(1);
    } finally {
      await locker.query('COMMIT').catch(() => undefined);
      await locker.end();
    }
    await waitFor(async () => (await processMetric('philotes_readers_held')) === 0, {
      what: 'the readers to carry on',
      timeoutMs: 60_000,
    });
    await sourcesGrow(SOURCES, 100);
    const after = await source.query<{ slot_name: string; active_pid: number }>(
      `SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name LIKE 'philotes_s%' ORDER BY 1`,
    );
    expect(after, 'every walsender survived the hold').toEqual(walsenders);
    for (const id of SOURCES) {
      expect((await readMetric(metricsPort, 'philotes_reader_restarts_total', id)) ?? 0).toBe(0);
    }
    await expectEverySourceExact();
  });
});
