/**
 * What the buffer database's problems look like to an operator. Problems waiting can fix (down,
 * read-only, out of connections) are waited out, each with its own message, while /healthz stays
 * 200 and /readyz says why it is 503; problems only a person can fix (credentials, a missing
 * database, a missing privilege) stop Philotes at once with exit 2 and one line, without first
 * claiming the buffer is "not reachable yet".
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../support/cluster.js';
import { connect, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { waitForExit } from '../support/faults.js';
import {
  runPhilotesToExit,
  startPhilotes,
  type PhilotesProcess,
  type PhilotesRun,
} from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

interface Readiness {
  status: string;
  buffer: { state: string; problem?: string | null; attempts?: number };
  sources: Array<{ source: string; state: string; lastError: string | null }>;
}

describe('buffer database errors', () => {
  let f: Fixture;
  const running: PhilotesProcess[] = [];

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query('CREATE TABLE landed (id int PRIMARY KEY)', [], 'app');
    await f.buffer.query(`CREATE ROLE weak LOGIN PASSWORD 'weak-pw'`);
    await f.buffer.query(`CREATE ROLE limited LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 0`);
    await f.buffer.query('CREATE DATABASE limited_buffer OWNER limited');
  });

  afterAll(async () => {
    for (const p of running) await p.kill9();
    await f?.destroy();
  });

  function notReachableLines(run: Pick<PhilotesRun, 'stdout'>): string[] {
    return run.stdout.filter((l) => /not reachable/.test(l));
  }

  function expectFatal(run: PhilotesRun): string {
    const context = `exit ${run.code}\nstderr:\n${run.stderr.join('\n')}\nstdout:\n${run.stdout.slice(-8).join('\n')}`;
    expect(run.code, context).toBe(2);
    expect(run.stderr, context).toHaveLength(1);
    expect(notReachableLines(run), context).toEqual([]);
    return run.stderr[0]!;
  }

  it('a wrong buffer password: exit 2 at once, one line, no "not reachable yet"', async () => {
    const run = await runPhilotesToExit(f.env({ PHILOTES_BUFFER_PASSWORD: 'wrong-pw-123' }));
    const line = expectFatal(run);
    expect(line).toContain('rejected the password (from PHILOTES_BUFFER_PASSWORD)');
    expect(line).not.toContain('wrong-pw-123');
  });

  it('a buffer database that does not exist: exit 2 at once', async () => {
    const run = await runPhilotesToExit(f.env({ PHILOTES_BUFFER_DATABASE: 'no_such_buffer' }));
    expect(expectFatal(run)).toMatch(/does not exist/);
  });

  it('a buffer user without the privilege to create the tables: exit 2 at once', async () => {
    const run = await runPhilotesToExit(
      f.env({ PHILOTES_BUFFER_USER: 'weak', PHILOTES_BUFFER_PASSWORD: 'weak-pw' }),
    );
    expect(expectFatal(run)).toMatch(/privilege/);
  });

  async function startWatched(
    env: Record<string, string>,
  ): Promise<{ p: PhilotesProcess; base: string }> {
    const port = await freePort();
    const p = startPhilotes(
      f.env({
        PHILOTES_METRICS_PORT: String(port),
        PHILOTES_METRICS_HOST: '127.0.0.1',
        PHILOTES_READINESS_GRACE: '1s',
        ...env,
      }),
    );
    running.push(p);
    return { p, base: `http://127.0.0.1:${port}` };
  }

  async function readiness(base: string): Promise<{ status: number; body: Readiness }> {
    const res = await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(5_000) });
    return { status: res.status, body: (await res.json()) as Readiness };
  }

  /** Waits until /readyz reports the buffer waiting for `problem` (after several attempts). */
  async function expectWaiting(base: string, p: PhilotesProcess, problem: RegExp): Promise<void> {
    const body = await waitFor(
      async () => {
        const r = await readiness(base);
        return r.status === 503 && (r.body.buffer.attempts ?? 0) >= 2 ? r.body : false;
      },
      { what: '/readyz 503 with the buffer waiting', timeoutMs: 30_000, intervalMs: 200 },
    );
    expect(body.buffer.state).toBe('waiting');
    expect(body.buffer.problem).toMatch(problem);
    expect(body.sources[0]!.lastError).toMatch(problem);
    const live = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(5_000) });
    expect(live.status).toBe(200);
    expect(p.proc.exitCode).toBeNull();
    expect(p.logs().some((l) => problem.test(String(l['msg'])))).toBe(true);
  }

  async function expectCaptures(base: string, id: number, slot = 'philotes_cdc'): Promise<void> {
    await waitFor(async () => (await readiness(base)).status === 200, {
      what: '/readyz 200',
      timeoutMs: 60_000,
      intervalMs: 200,
    });
    // /readyz is 200 for a source that has not failed since the buffer opened, streaming or
    // not yet: the row must come after the slot exists to be in its stream (snapshot: never).
    await waitForSlotActive(f.source, slot);
    await f.source.query('INSERT INTO landed VALUES ($1)', [id], 'app');
  }

  it('a read-only buffer is waited for with its own message, and used once it accepts writes', async () => {
    await f.buffer.query('ALTER DATABASE buffer SET default_transaction_read_only = on');
    const { p, base } = await startWatched({});
    try {
      await expectWaiting(base, p, /read-only/);
    } finally {
      await f.buffer.query('ALTER DATABASE buffer RESET default_transaction_read_only');
    }
    await expectCaptures(base, 1);
    await waitFor(
      async () =>
        (
          await f.buffer.query(
            `SELECT 1 FROM cdc_events WHERE table_name = 'landed' AND after->>'id' = '1'`,
            [],
            'buffer',
          )
        ).length === 1,
      { what: 'row 1 stored', timeoutMs: 30_000 },
    );
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a buffer that turns read-only while streaming: not ready within the grace period although every wait between attempts is shorter, and every change lands once it accepts writes again', async () => {
    const { p, base } = await startWatched({
      PHILOTES_CDC_SOURCE_ID: 'flapping',
      PHILOTES_CDC_REPLICATION_SLOT: 'flapping_slot',
      // No single backoff wait comes near the grace period: only counting the whole outage
      // across attempts can make /readyz 503.
      PHILOTES_RESTART_MAX_DELAY: '500ms',
      PHILOTES_READINESS_GRACE: '4s',
    });
    await waitForSlotActive(f.source, 'flapping_slot');
    await waitFor(async () => (await readiness(base)).status === 200, {
      what: '/readyz 200 while streaming',
      timeoutMs: 60_000,
      intervalMs: 200,
    });
    const admin = await connect(f.buffer, 'buffer');
    const setReadOnly = async (on: boolean) => {
      await admin.query('SET default_transaction_read_only = off');
      await admin.query(
        on
          ? 'ALTER SYSTEM SET default_transaction_read_only = on'
          : 'ALTER SYSTEM RESET default_transaction_read_only',
      );
      await admin.query('SELECT pg_reload_conf()');
    };
    try {
      await setReadOnly(true);
      // Changes keep coming; storing them fails, and so does every new attempt to start.
      let id = 100;
      const writer = setInterval(() => {
        void f.source.query('INSERT INTO landed VALUES ($1)', [id++], 'app').catch(() => undefined);
      }, 100);
      try {
        await waitFor(async () => (await readiness(base)).status === 503, {
          what: '/readyz 503 while the buffer refuses writes',
          timeoutMs: 20_000,
          intervalMs: 200,
        });
        const { body } = await readiness(base);
        expect(body.sources[0]!.lastError).toMatch(/read-only/);
        expect(p.logs().some((l) => /read-only/.test(String(l['msg'])))).toBe(true);
      } finally {
        clearInterval(writer);
      }
      await setReadOnly(false);
      const written = id - 100;
      await waitFor(async () => (await readiness(base)).status === 200, {
        what: '/readyz 200 again',
        timeoutMs: 60_000,
        intervalMs: 200,
      });
      const rows = await waitFor(
        async () => {
          const r = await f.buffer.query<{ id: number }>(
            `SELECT (after->>'id')::int AS id FROM cdc_events
              WHERE source_id = 'flapping' AND table_name = 'landed' AND (after->>'id')::int >= 100
              ORDER BY lsn, seq`,
            [],
            'buffer',
          );
          const committed = await f.source.query<{ n: number }>(
            'SELECT count(*)::int AS n FROM landed WHERE id >= 100',
            [],
            'app',
          );
          return r.length >= committed[0]!.n && committed[0]!.n > 0 ? r : false;
        },
        { what: 'every row written meanwhile to be stored', timeoutMs: 60_000 },
      );
      const ids = rows.map((r) => r.id);
      expect(new Set(ids).size).toBe(ids.length); // once each
      expect(ids.length).toBeLessThanOrEqual(written);
    } finally {
      await setReadOnly(false).catch(() => undefined);
      await admin.end();
    }
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a buffer out of connections is waited for with its own message', async () => {
    const { p, base } = await startWatched({
      PHILOTES_BUFFER_DATABASE: 'limited_buffer',
      PHILOTES_BUFFER_USER: 'limited',
      PHILOTES_BUFFER_PASSWORD: 'limited-pw',
      PHILOTES_CDC_REPLICATION_SLOT: 'limited_slot',
    });
    try {
      await expectWaiting(base, p, /connection slot/);
    } finally {
      await f.buffer.query('ALTER ROLE limited CONNECTION LIMIT -1');
    }
    await expectCaptures(base, 2, 'limited_slot');
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a buffer that is down: waited for (not an exit), and SIGTERM during the wait exits 0', async () => {
    const { p, base } = await startWatched({ PHILOTES_BUFFER_PORT: String(await freePort()) });
    await expectWaiting(base, p, /not reachable/);
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });
});
