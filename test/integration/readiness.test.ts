/**
 * /readyz tells the truth: a source that is not capturing turns it 503 within the grace period
 * and keeps it there however many retries it makes, with the reason per source; /healthz
 * (liveness) stays 200, because a remote database being down is no reason to restart Philotes.
 * Once the source streams again, /readyz is 200 again.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../support/cluster.js';
import {
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { readMetric, sampleFor } from '../support/faults.js';
import {
  linesWithDuplicateKeys,
  startPhilotes,
  type PhilotesProcess,
} from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

interface SourceReport {
  source: string;
  ready: boolean;
  state: string;
  attempts: number;
  nextAttemptAt: string | null;
  notStreamingSeconds: number | null;
  lastError: string | null;
}

interface Readiness {
  status: string;
  sources: SourceReport[];
}

const GRACE = '2s';

describe('readiness and liveness', () => {
  let f: Fixture;
  const running: PhilotesProcess[] = [];

  beforeAll(async () => {
    f = await startFixture();
  });

  afterAll(async () => {
    for (const p of running) await p.kill9();
    await f?.destroy();
  });

  async function start(
    env: Record<string, string>,
  ): Promise<{ p: PhilotesProcess; base: string; port: number }> {
    const port = await freePort();
    const p = startPhilotes(
      f.env({
        PHILOTES_METRICS_PORT: String(port),
        PHILOTES_METRICS_HOST: '127.0.0.1',
        PHILOTES_READINESS_GRACE: GRACE,
        ...env,
      }),
    );
    running.push(p);
    return { p, base: `http://127.0.0.1:${port}`, port };
  }

  async function get(url: string): Promise<{ status: number; body: Readiness }> {
    const res = await fetch(url, { signal: AbortSignal.timeout(5_000) });
    return { status: res.status, body: (await res.json()) as Readiness };
  }

  /** Waits for /readyz to answer 503, then checks that it stays 503 across further retries. */
  async function expectNotReady(base: string, port: number): Promise<SourceReport> {
    await waitFor(async () => (await get(`${base}/readyz`)).status === 503, {
      what: '/readyz to answer 503',
      timeoutMs: 30_000,
      intervalMs: 200,
    });
    const samples = await sampleFor(
      3_000,
      '/readyz',
      async () => (await get(`${base}/readyz`)).status,
      300,
    );
    expect(new Set(samples)).toEqual(new Set([503]));
    const live = await get(`${base}/healthz`);
    expect(live.status).toBe(200);
    const { body } = await get(`${base}/readyz`);
    expect(body.status).toBe('not ready');
    expect(body.sources).toHaveLength(1);
    const report = body.sources[0]!;
    expect(report.ready).toBe(false);
    expect(report.state).not.toBe('streaming');
    expect(report.attempts).toBeGreaterThanOrEqual(2);
    expect(report.notStreamingSeconds).toBeGreaterThanOrEqual(2);
    expect(await readMetric(port, 'philotes_source_ready')).toBe(0);
    expect(await readMetric(port, 'philotes_reader_consecutive_failures')).toBeGreaterThanOrEqual(
      2,
    );
    return report;
  }

  it('a source whose port is closed: 503 within the grace period and for as long as it lasts; the reason names the address', async () => {
    const deadPort = await freePort();
    const { p, base, port } = await start({ PHILOTES_CDC_SOURCE_PORT: String(deadPort) });
    const report = await expectNotReady(base, port);
    expect(report.lastError).toContain(`connection refused by source 127.0.0.1:${deadPort}`);
    // While it backs off, /readyz says when the next attempt is.
    const withNext = await waitFor(
      async () => {
        const r = (await get(`${base}/readyz`)).body.sources[0]!;
        return r.state === 'backoff' && r.nextAttemptAt !== null ? r : false;
      },
      { what: 'a report in backoff with the next attempt time', timeoutMs: 10_000, intervalMs: 50 },
    );
    expect(Date.parse(withNext.nextAttemptAt!)).toBeGreaterThan(Date.now() - 5_000);
    expect(p.logs().some((l) => /next attempt in/.test(String(l['msg'])))).toBe(true);
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await p.exited).toEqual({ code: 0, signal: null });
    expect(linesWithDuplicateKeys(p.stdout)).toEqual([]);
  });

  it('a source host that does not resolve: 503, and the reason says so', async () => {
    const { p, base, port } = await start({ PHILOTES_CDC_SOURCE_HOST: 'no-such-host.invalid' });
    const report = await expectNotReady(base, port);
    expect(report.lastError).toContain('cannot resolve the source host "no-such-host.invalid"');
    await p.kill9();
  });

  it('a slot held by another client: 503 until it is released, then streaming and 200 again', async () => {
    // Another client streams the slot, so every START_REPLICATION of Philotes is refused.
    await f.source.query(`CREATE PUBLICATION philotes_pub FOR ALL TABLES`, [], 'app');
    await f.source.query(
      `SELECT pg_create_logical_replication_slot('philotes_cdc', 'pgoutput')`,
      [],
      'app',
    );
    const holder = new pg.Client({
      connectionString: f.source.url('app'),
      replication: 'database',
    } as pg.ClientConfig);
    holder.on('error', () => undefined);
    await holder.connect();
    const holding = holder
      .query(
        `START_REPLICATION SLOT philotes_cdc LOGICAL 0/0 (proto_version '1', publication_names 'philotes_pub')`,
      )
      .catch(() => undefined);
    await waitForSlotActive(f.source);

    const { p, base, port } = await start({});
    const report = await expectNotReady(base, port);
    expect(report.lastError).toMatch(/philotes_cdc.*active/);

    await holder.end();
    await holding;
    await waitFor(async () => (await get(`${base}/readyz`)).status === 200, {
      what: '/readyz to answer 200 once the slot is free',
      timeoutMs: 60_000,
      intervalMs: 200,
    });
    const { body } = await get(`${base}/readyz`);
    expect(body.sources[0]).toMatchObject({ state: 'streaming', ready: true, attempts: 0 });
    // And it really captures.
    await f.source.query('CREATE TABLE ready_check (id int PRIMARY KEY)', [], 'app');
    await f.source.query('INSERT INTO ready_check VALUES (1)', [], 'app');
    await waitFor(
      async () =>
        (
          await f.buffer.query(
            `SELECT 1 FROM cdc_events WHERE table_name = 'ready_check'`,
            [],
            'buffer',
          )
        ).length === 1,
      { what: 'the row to be stored', timeoutMs: 30_000 },
    );
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await p.exited).toEqual({ code: 0, signal: null });
  });

  it("an idle source on a server shared with a busy database: its lag is its own, not the neighbour's WAL", async () => {
    await f.source.createDatabase('quiet');
    await f.source.createDatabase('busy');
    await f.source.query('CREATE TABLE q (id int PRIMARY KEY)', [], 'quiet');
    await f.source.query(ITEMS_DDL, [], 'busy');
    const { p, base } = await start({
      PHILOTES_CDC_SOURCE_DATABASE: 'quiet',
      PHILOTES_CDC_SOURCE_ID: 'quiet',
      PHILOTES_CDC_REPLICATION_SLOT: 'philotes_quiet',
      PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    });
    await waitForSlotActive(f.source, 'philotes_quiet');
    await f.source.query('INSERT INTO q VALUES (1)', [], 'quiet');
    type Lag = { lagSeconds: number | null; lagBytes: number | null; lastStoredAt: string | null };
    const quiet = async () => (await get(`${base}/readyz`)).body.sources[0] as unknown as Lag;
    await waitFor(async () => (await quiet()).lastStoredAt !== null, {
      what: "quiet's one commit to be stored",
      timeoutMs: 30_000,
    });
    const load = startLoad(f.source, { clients: 2, database: 'busy' });
    try {
      // The neighbour writes WAL all along; quiet's last commit grows old meanwhile.
      const lags = await sampleFor(
        12_000,
        'lagSeconds',
        async () => (await quiet()).lagSeconds,
        500,
      );
      const last = await quiet();
      expect(Date.now() - Date.parse(last.lastStoredAt!)).toBeGreaterThan(11_000);
      expect(load.stats.committedTransactions).toBeGreaterThan(10);
      // Seconds since the stored position was passed, not since quiet last committed.
      expect(Math.max(...lags.map((l) => l ?? 0)), JSON.stringify(lags)).toBeLessThanOrEqual(5);
    } finally {
      await load.stop();
    }
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await p.exited).toEqual({ code: 0, signal: null });
  });
});
