/**
 * Snapshot windows under the interleavings that broke them (issue 19), each made deterministic
 * with locks, a synchronous standby that is not there, and logical_decoding_work_mem = 64kB:
 *
 * - a commit the stream shows before the low watermark that is not visible yet (it waits for the
 *   synchronous standby): the chunk must not be read before it is;
 * - a large transaction already streaming when the snapshot begins, committing inside the
 *   chunk's window after the chunk was read;
 * - a streamed TRUNCATE inside a window whose transaction rolls back.
 *
 * Each asserts on the buffer: replayed in (lsn, seq) order it equals the table. The tests watch
 * the copy connection (application_name philotes:app) in pg_stat_activity to know where the copy
 * is; each condition holds for the code before the fix as for the code after it, so each test
 * fails on the former.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('snapshot windows under racing transactions', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  const clients: pg.Client[] = [];

  const q = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.source.query<T>(sql, params, 'app');
  const b = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.buffer.query<T>(sql, params, 'buffer');

  beforeAll(async () => {
    f = await startFixture({ sourceSettings: { logical_decoding_work_mem: '64kB' } });
    await q(`CREATE TABLE filler (id serial PRIMARY KEY, pad text)`);
    // One chunk per table: the window spans the whole copy of it.
    philotes = startPhilotes(f.env({ PHILOTES_CDC_SNAPSHOT_CHUNK_ROWS: '100000' }));
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    await phantomStandby(false).catch(() => undefined);
    for (const c of clients) await c.end().catch(() => undefined);
    await philotes?.kill9();
    await f?.destroy();
  });

  async function session(): Promise<{ client: pg.Client; pid: number }> {
    const client = await connect(f.source, 'app');
    clients.push(client);
    const [row] = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows;
    return { client, pid: row!.pid };
  }

  /**
   * A synchronous standby that is not there: a session with synchronous_commit = on (see
   * waitsForStandby) writes its commit and then waits, invisible, for as long as it is named.
   * Everyone else commits locally, as a source with a slow standby does for the sessions that
   * do not ask for more.
   */
  async function phantomStandby(on: boolean): Promise<void> {
    if (on) {
      await q(`ALTER SYSTEM SET synchronous_standby_names = 'nobody_is_there'`);
      await q(`ALTER SYSTEM SET synchronous_commit = 'local'`);
    } else {
      await q(`ALTER SYSTEM RESET synchronous_standby_names`);
      await q(`ALTER SYSTEM RESET synchronous_commit`);
    }
    await q(`SELECT pg_reload_conf()`);
  }

  async function waitsForStandby(client: pg.Client): Promise<void> {
    await client.query(`SET synchronous_commit = on`);
  }

  async function waitEvent(pid: number, event: string): Promise<void> {
    await waitFor(
      async () =>
        (
          await q<{ e: string | null }>(
            `SELECT wait_event AS e FROM pg_stat_activity WHERE pid = $1`,
            [pid],
          )
        )[0]?.e === event,
      { what: `backend ${pid} to wait on ${event}`, timeoutMs: 30_000 },
    );
  }

  /** Philotes' copy connection: its last query, and what it waits on. */
  async function copyConnection(): Promise<Array<{ query: string; wait: string | null }>> {
    return q<{ query: string; wait: string | null }>(
      `SELECT query, wait_event_type AS wait FROM pg_stat_activity
        WHERE application_name = 'philotes:app' AND backend_type = 'client backend'`,
    );
  }

  const WAITING_FOR_TRANSACTIONS = 'pg_visible_in_snapshot';

  async function requestSnapshot(table: string): Promise<number> {
    const [row] = await b<{ id: string }>(`SELECT philotes_request_snapshot('app', $1) AS id`, [
      [`public.${table}`],
    ]);
    return Number(row!.id);
  }

  async function waitForSnapshotDone(id: number): Promise<void> {
    await waitFor(
      async () =>
        (await b<{ state: string }>(`SELECT state FROM cdc_snapshots WHERE id = $1`, [id]))[0]
          ?.state === 'done',
      { what: `snapshot #${id} to finish`, timeoutMs: 90_000 },
    );
  }

  async function snapshotRows(table: string): Promise<number> {
    const [row] = await b<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = $1 AND operation = 'SNAPSHOT'`,
      [table],
    );
    return row!.n;
  }

  /** Every change stored so far, then the buffer replayed for `table` equals it on the source. */
  async function expectReplayEqualsSource(table: string): Promise<void> {
    const marker = `m${Date.now()}`;
    await q(`INSERT INTO filler (pad) VALUES ($1)`, [marker]);
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE after->>'pad' = $1`,
            [marker],
          )
        )[0]!.n === 1,
      { what: 'the marker to be stored', timeoutMs: 60_000 },
    );
    const events = await b<{
      operation: string;
      before: { id: number } | null;
      after: { id: number; v: string } | null;
    }>(`SELECT operation, before, after FROM cdc_events WHERE table_name = $1 ORDER BY lsn, seq`, [
      table,
    ]);
    const replay = new Map<number, string>();
    for (const e of events) {
      if (e.operation === 'TRUNCATE') replay.clear();
      else if (e.operation === 'DELETE') replay.delete(e.before!.id);
      else replay.set(e.after!.id, e.after!.v);
    }
    const source = await q<{ id: number; v: string }>(`SELECT id, v FROM ${table}`);
    expect(replay.size, `${table}: rows in the replay`).toBe(source.length);
    const wrong = source.filter((r) => replay.get(r.id) !== r.v).slice(0, 5);
    expect(wrong, `${table}: rows whose replayed value differs`).toEqual([]);
  }

  it('a commit the stream shows before the low watermark but not yet visible: the chunk waits for it', async () => {
    await q(`CREATE TABLE vis (id int PRIMARY KEY, v text);
             INSERT INTO vis SELECT g, 'orig' FROM generate_series(1, 2000) g`);
    await phantomStandby(true);
    const x = await session();
    await waitsForStandby(x.client);
    // Written to the WAL and streamed, invisible to everyone until the standby answers.
    const committed = x.client.query(`UPDATE vis SET v = 'new' WHERE id = 1500`);
    await waitEvent(x.pid, 'SyncRep');
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'vis' AND operation = 'UPDATE'`,
          )
        )[0]!.n === 1,
      { what: 'the invisible UPDATE to be stored from the stream', timeoutMs: 30_000 },
    );
    const id = await requestSnapshot('vis');
    // The copy has either read the table already (and stored its rows) or waits for the
    // transaction: only then is it released.
    await waitFor(
      async () =>
        (await snapshotRows('vis')) > 0 ||
        (await copyConnection()).some((c) => c.query.includes(WAITING_FOR_TRANSACTIONS)),
      { what: 'the copy of vis to read or to wait', timeoutMs: 30_000 },
    );
    await phantomStandby(false);
    await committed;
    await waitForSnapshotDone(id);
    await expectReplayEqualsSource('vis');
  });

  it('a transaction streaming before the snapshot began, committing inside the window after the chunk was read', async () => {
    await q(`CREATE TABLE big (id int PRIMARY KEY, v text);
             INSERT INTO big SELECT g, 'orig' FROM generate_series(1, 40000) g`);
    const x = await session();
    await waitsForStandby(x.client);
    await x.client.query('BEGIN');
    // Streamed to Philotes in blocks while in progress (well past 64kB).
    await x.client.query(`UPDATE big SET v = 'new' WHERE id BETWEEN 30001 AND 35000`);
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_staged WHERE table_name = 'big'`,
          )
        )[0]!.n > 0,
      { what: 'the open transaction to be streamed', timeoutMs: 30_000 },
    );
    // A lock request queued behind the open transaction holds the chunk query back (it queues
    // behind it) until the transaction has committed, invisibly. (On PostgreSQL 18 reading the
    // publication's tables queues already, before the low watermark: the commit then precedes
    // the window, invisible, which is the first test's race.)
    const l = await session();
    const locked = l.client
      .query(`BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE`)
      .catch((e: unknown) => e);
    await waitFor(
      async () =>
        (
          await q<{ w: string | null }>(
            `SELECT wait_event_type AS w FROM pg_stat_activity WHERE pid = $1`,
            [l.pid],
          )
        )[0]?.w === 'Lock',
      { what: 'the lock request to queue', timeoutMs: 30_000 },
    );
    const id = await requestSnapshot('big');
    await waitFor(
      async () =>
        (await copyConnection()).some(
          (c) => c.query.includes(WAITING_FOR_TRANSACTIONS) || c.wait === 'Lock',
        ),
      { what: 'the copy of big to begin (low watermark written)', timeoutMs: 30_000 },
    );
    // Its last block touches another table only; its commit waits for the phantom standby.
    await phantomStandby(true);
    await x.client.query(`INSERT INTO filler (pad) SELECT 'p' FROM generate_series(1, 10)`);
    const committed = x.client.query('COMMIT');
    await waitEvent(x.pid, 'SyncRep');
    await q(`SELECT pg_cancel_backend($1)`, [l.pid]);
    await locked;
    await l.client.query('ROLLBACK');
    await waitFor(
      async () =>
        (await snapshotRows('big')) > 0 ||
        (await copyConnection()).some((c) => c.query.includes(WAITING_FOR_TRANSACTIONS)),
      { what: 'the copy of big to read or to wait', timeoutMs: 30_000 },
    );
    await phantomStandby(false);
    await committed;
    await waitForSnapshotDone(id);
    await expectReplayEqualsSource('big');
  });

  it('a streamed TRUNCATE inside the window that rolls back: every row is still copied', async () => {
    await q(`CREATE TABLE tr (id int PRIMARY KEY, v text);
             INSERT INTO tr SELECT g, 'kept' FROM generate_series(1, 20000) g`);
    // A reader of the table holds the TRUNCATE back; the chunk query queues behind the TRUNCATE.
    const l = await session();
    await l.client.query(`BEGIN; SELECT count(*) FROM tr`);
    const x = await session();
    await x.client.query('BEGIN');
    const truncated = x.client.query(`TRUNCATE tr`);
    await waitEvent(x.pid, 'relation');
    const id = await requestSnapshot('tr');
    // Queued behind the TRUNCATE, or waiting for its transaction (which took an xid): the low
    // watermark is written before the TRUNCATE is. (On PostgreSQL 18 reading the publication's
    // tables already queues behind it, before the low watermark: then the window opens after
    // the rollback, and the test shows that a copy after it is whole.)
    await waitFor(
      async () =>
        (await copyConnection()).some(
          (c) => c.query.includes(WAITING_FOR_TRANSACTIONS) || c.wait === 'Lock',
        ),
      { what: 'the copy of tr to begin (low watermark written)', timeoutMs: 30_000 },
    );
    await l.client.query('COMMIT');
    await truncated;
    // Enough after it that the transaction, TRUNCATE included, is streamed while in progress.
    await x.client.query(
      `INSERT INTO filler (pad) SELECT repeat('p', 200) FROM generate_series(1, 2000)`,
    );
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_staged WHERE table_name = 'tr' AND operation = 'TRUNCATE'`,
          )
        )[0]!.n > 0,
      { what: 'the TRUNCATE to be streamed', timeoutMs: 30_000 },
    );
    await x.client.query('ROLLBACK');
    await waitForSnapshotDone(id);
    expect(await snapshotRows('tr')).toBe(20000);
    await expectReplayEqualsSource('tr');
  });
});
