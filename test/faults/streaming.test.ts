/**
 * Large transactions streamed while in progress (pgoutput protocol 2, the default on PostgreSQL
 * 14+). The source decodes with logical_decoding_work_mem at its minimum (64kB), so every
 * transaction here outgrows it and is streamed in many blocks. What must hold:
 * - nothing of an unfinished transaction reaches cdc_events; it waits in cdc_staged;
 * - at its commit it lands once, at its commit LSN, in commit order with the transactions that
 *   committed while it was in progress, and the source spills nothing to its disk;
 * - a rolled-back transaction and a rolled-back subtransaction leave nothing behind;
 * - a kill -9 in its middle: the next run stores it exactly once;
 * - protocol 1 still works (the server spills instead).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { connect, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('streamed in-progress transactions', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  let app: pg.Client;
  let other: pg.Client;

  const count = async (sql: string, params: unknown[] = []) =>
    Number((await f.buffer.query<{ n: string }>(`SELECT (${sql}) AS n`, params, 'buffer'))[0]!.n);
  const staged = () => count(`SELECT count(*) FROM cdc_staged WHERE source_id = 'app'`);
  /** Staged rows of committed transactions are deleted just after their commit is stored. */
  const noneStaged = (source = 'app') =>
    waitFor(
      async () =>
        (await count(`SELECT count(*) FROM cdc_staged WHERE source_id = $1`, [source])) === 0,
      { what: `no staged rows of ${source}`, timeoutMs: 30_000 },
    );
  const stagedOrZero = async () =>
    (await count(`SELECT to_regclass('cdc_staged') IS NOT NULL`)) ? staged() : 0;
  const slotStats = async (slot = 'philotes_cdc') =>
    (
      await f.source.query<{ spill_txns: string; stream_txns: string }>(
        'SELECT spill_txns, stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1',
        [slot],
        'app',
      )
    )[0]!;
  /** Inserts `marker` through its own transaction and waits until it is stored. */
  const marker = async (id: number, source = 'app') => {
    await other.query('INSERT INTO marker VALUES ($1)', [id]);
    await waitFor(
      async () =>
        (await count(
          `SELECT count(*) FROM cdc_events WHERE source_id = $1 AND table_name = 'marker' AND (after->>'id')::int = $2`,
          [source, id],
        )) === 1,
      { what: `marker ${id} of ${source}`, timeoutMs: 120_000 },
    );
  };
  const waitForStaged = (atLeast: number) =>
    waitFor(async () => (await stagedOrZero()) >= atLeast, {
      what: `${atLeast} staged rows`,
      timeoutMs: 60_000,
    });

  beforeAll(async () => {
    f = await startFixture({ sourceSettings: { logical_decoding_work_mem: '64kB' } });
    await f.source.query(`CREATE TABLE marker (id int PRIMARY KEY);`, [], 'app');
    philotes = startPhilotes(f.env({ PHILOTES_CDC_DDL: 'on' }));
    await waitForSlotActive(f.source);
    app = await connect(f.source, 'app');
    other = await connect(f.source, 'app');
  });

  /**
   * A test's own large table (and `small`), made before `start`: the test reads only what it
   * wrote, and passes alone and in any order.
   */
  const tables = async (big: string, small?: string) => {
    await app.query(`CREATE TABLE ${big} (id int PRIMARY KEY, part text NOT NULL, pad text)`);
    if (small) await app.query(`CREATE TABLE ${small} (id int PRIMARY KEY)`);
    return (await app.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]!
      .lsn;
  };

  afterAll(async () => {
    await app?.end();
    await other?.end();
    await philotes?.kill9();
    await f?.destroy();
  });

  it('stages a transaction until it commits, then stores it once, in commit order, with nothing spilled', async () => {
    const start = await tables('big1', 'small1');
    const statsBefore = await slotStats();
    await app.query('BEGIN');
    for (let chunk = 0; chunk < 3; chunk++) {
      await app.query(
        `INSERT INTO big1 SELECT g, 'a', repeat('x', 40) FROM generate_series($1::int, $2::int) g`,
        [chunk * 100_000 + 1, (chunk + 1) * 100_000],
      );
      // Committed while the large one is in progress: stored first, in commit order.
      await other.query('INSERT INTO small1 VALUES ($1)', [chunk]);
    }
    // The server streams it while it is in progress; none of it is an event yet.
    await waitForStaged(100_000);
    await marker(1);
    const since = `source_id = 'app' AND lsn > '${start}'::pg_lsn`;
    expect(
      await count(`SELECT count(*) FROM cdc_events WHERE ${since} AND table_name = 'big1'`),
    ).toBe(0);
    expect(
      await count(`SELECT count(*) FROM cdc_events WHERE ${since} AND table_name = 'small1'`),
    ).toBe(3);
    await app.query('COMMIT');
    await marker(2);

    const [summary] = await f.buffer.query<Record<string, string>>(
      `SELECT count(*) AS n, count(DISTINCT (after->>'id')) AS ids, count(DISTINCT lsn) AS lsns,
              count(DISTINCT xid) AS xids, min(seq)::text AS min_seq, max(seq)::text AS max_seq
         FROM cdc_events WHERE ${since} AND table_name = 'big1'`,
      [],
      'buffer',
    );
    expect(summary).toEqual({
      n: '300000',
      ids: '300000',
      lsns: '1',
      xids: '1',
      min_seq: '1',
      max_seq: '300000',
    });
    // In the order the source wrote them.
    expect(
      await count(
        `SELECT count(*) FROM cdc_events WHERE ${since} AND table_name = 'big1' AND (after->>'id')::int <> seq`,
      ),
    ).toBe(0);
    // Commit order: the small transactions and marker 1 before it, marker 2 after it.
    const order = await f.buffer.query<{ table_name: string; n: string }>(
      `SELECT table_name, count(*) AS n FROM (
         SELECT table_name, lsn, seq,
                row_number() OVER (ORDER BY lsn, seq) - row_number() OVER (PARTITION BY table_name ORDER BY lsn, seq) AS grp
           FROM cdc_events WHERE ${since}) t
        GROUP BY table_name, grp ORDER BY min(lsn), min(seq)`,
      [],
      'buffer',
    );
    expect(order.map((r) => [r.table_name, r.n])).toEqual([
      ['small1', '3'],
      ['marker', '1'],
      ['big1', '300000'],
      ['marker', '1'],
    ]);
    // The source's commit time and xid, as for any transaction.
    const [times] = await f.buffer.query<{ same: boolean }>(
      `SELECT (SELECT committed_at FROM cdc_events WHERE ${since} AND table_name = 'big1' LIMIT 1) >
              (SELECT committed_at FROM cdc_events WHERE ${since} AND table_name = 'small1' ORDER BY lsn DESC LIMIT 1) AS same`,
      [],
      'buffer',
    );
    expect(times!.same).toBe(true);
    await noneStaged();
    // The slot's counters are cumulative: what this transaction added to them.
    const stats = await slotStats();
    expect(Number(stats.stream_txns) - Number(statsBefore.stream_txns)).toBeGreaterThan(0);
    expect(Number(stats.spill_txns) - Number(statsBefore.spill_txns)).toBe(0);
  });

  it('a rolled-back transaction and a rolled-back subtransaction leave nothing behind', async () => {
    await tables('big2');
    await app.query('BEGIN');
    await app.query(
      `INSERT INTO big2 SELECT g, 'kept', NULL FROM generate_series(400001, 450000) g`,
    );
    await app.query('SAVEPOINT s');
    await app.query(
      `INSERT INTO big2 SELECT g, 'sub rolled back', NULL FROM generate_series(450001, 550000) g`,
    );
    await waitForStaged(100_000); // the subtransaction's rows were streamed
    await app.query('ROLLBACK TO SAVEPOINT s');
    await app.query(
      `INSERT INTO big2 SELECT g, 'kept', NULL FROM generate_series(550001, 560000) g`,
    );
    await app.query('COMMIT');

    // A rolled-back transaction of 1M rows, most of it streamed (staged) before the rollback.
    await app.query('BEGIN');
    await app.query(
      `INSERT INTO big2 SELECT g, 'rolled back', NULL FROM generate_series(1000001, 2000000) g`,
    );
    await waitForStaged(500_000);
    await app.query('ROLLBACK');
    await marker(3);

    const parts = await f.buffer.query<{ part: string; n: string }>(
      `SELECT after->>'part' AS part, count(*) AS n FROM cdc_events
        WHERE source_id = 'app' AND table_name = 'big2' AND operation <> 'DDL' GROUP BY 1 ORDER BY 1`,
      [],
      'buffer',
    );
    expect(parts).toEqual([{ part: 'kept', n: '60000' }]);
    await noneStaged();
  });

  it('kill -9 in the middle of a streamed transaction, restarted while it is open: it is stored exactly once', async () => {
    await tables('big3');
    await app.query('BEGIN');
    await app.query(
      `INSERT INTO big3 SELECT g, 'killed', NULL FROM generate_series(800001, 900000) g`,
    );
    await waitForStaged(20_000);
    await philotes!.kill9();
    // Restarted while the transaction is still open: the rows the killed run staged are void;
    // the source sends the transaction again from its start (streamed once it grows past the
    // restart point, or whole at its commit).
    philotes = startPhilotes(f.env({ PHILOTES_CDC_DDL: 'on' }));
    await waitForSlotActive(f.source);
    await app.query(
      `INSERT INTO big3 SELECT g, 'killed', NULL FROM generate_series(900001, 950000) g`,
    );
    await app.query('COMMIT');
    await marker(4);
    const [stored] = await f.buffer.query<{ n: string; ids: string }>(
      `SELECT count(*) AS n, count(DISTINCT after->>'id') AS ids FROM cdc_events
        WHERE source_id = 'app' AND table_name = 'big3' AND operation <> 'DDL'`,
      [],
      'buffer',
    );
    expect(stored).toEqual({ n: '150000', ids: '150000' });
    await noneStaged();
  });

  it('a migration streamed while in progress: its DDL lands first, in its transaction, and makes the schema version', async () => {
    // The rows it updates, stored before.
    await tables('big4');
    await app.query(
      `INSERT INTO big4 SELECT g, 'm', repeat('x', 40) FROM generate_series(1, 100000) g`,
    );
    await marker(60);
    await app.query('BEGIN');
    await app.query('ALTER TABLE big4 ADD COLUMN extra int');
    await app.query('UPDATE big4 SET extra = 7 WHERE id <= 100000');
    await waitForStaged(50_000);
    await app.query('COMMIT');
    await marker(6);
    const [ddl] = await f.buffer.query<{ lsn: string; seq: number }>(
      `SELECT lsn::text, seq FROM cdc_events
        WHERE operation = 'DDL' AND table_name = 'big4' AND details->>'command_tag' = 'ALTER TABLE'`,
      [],
      'buffer',
    );
    expect(ddl).toMatchObject({ seq: 1 });
    const [tx] = await f.buffer.query<Record<string, string>>(
      `SELECT count(*) FILTER (WHERE operation = 'UPDATE' AND (after->>'extra')::int = 7) AS updates,
              count(*) AS events, min(seq)::text AS first, max(seq)::text AS last
         FROM cdc_events WHERE lsn = $1::pg_lsn`,
      [ddl!.lsn],
      'buffer',
    );
    expect(tx).toEqual({ updates: '100000', events: '100001', first: '1', last: '100001' });
    // The new shape is a schema version linked to that DDL, at the transaction's commit LSN.
    const [version] = await f.buffer.query<{ lsn: string; ddl: Record<string, unknown> }>(
      `SELECT lsn, ddl FROM cdc_schema_history WHERE table_name = 'big4' ORDER BY version DESC LIMIT 1`,
      [],
      'buffer',
    );
    expect(version!.lsn).toBe(ddl!.lsn);
    expect(version!.ddl).toMatchObject({
      lsn: ddl!.lsn,
      seq: 1,
      statement: 'ALTER TABLE big4 ADD COLUMN extra int',
    });
    await noneStaged();
  });

  it('protocol 1: the server spills the transaction instead, and it still lands once', async () => {
    const v1 = startPhilotes(
      f.env({
        PHILOTES_CDC_PROTOCOL: '1',
        PHILOTES_CDC_SOURCE_ID: 'v1',
        PHILOTES_CDC_REPLICATION_SLOT: 'philotes_v1',
      }),
    );
    try {
      await waitForSlotActive(f.source, 'philotes_v1');
      await tables('big5');
      await app.query(
        `INSERT INTO big5 SELECT g, 'v1', NULL FROM generate_series(1000001, 1050000) g`,
      );
      await marker(5, 'v1');
      expect(
        await count(
          `SELECT count(DISTINCT after->>'id') FROM cdc_events WHERE source_id = 'v1' AND table_name = 'big5' AND operation = 'INSERT'`,
        ),
      ).toBe(50_000);
      await noneStaged('v1');
      const stats = await slotStats('philotes_v1');
      expect(Number(stats.stream_txns)).toBe(0);
      expect(Number(stats.spill_txns)).toBeGreaterThan(0);
    } finally {
      await v1.kill9();
    }
  });
});
