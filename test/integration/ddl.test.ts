/**
 * DDL capture (`ddl: true`): Philotes installs an event trigger on the source, every DDL command
 * lands as a DDL event at its exact place among the rows (same transaction, same commit LSN, seq
 * order), and replaying the buffer alone — DDL statements and rows in (lsn, seq) order — into an
 * empty database rebuilds the source's schema and data. The schema history names the DDL that
 * made each version. DDL keeps working while Philotes is down, a role that may not install the
 * trigger gets a clear error, and `ddl-trigger` installs, prints and removes it.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type pg from 'pg';
import { connect, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import {
  runPhilotesToExit,
  runUntilSourceFails,
  startPhilotes,
  type PhilotesProcess,
} from '../support/philotes.js';
import { parseLsn } from '../../src/common/lsn.js';
import { waitFor } from '../support/poll.js';

interface StoredEvent {
  lsn: string;
  seq: number;
  operation: string;
  schema_name: string;
  table_name: string;
  before: Record<string, unknown> | null;
  after: Record<string, unknown> | null;
  primary_key: string[];
  details: {
    statement?: string;
    command_tag?: string;
    json_null?: { after?: string[] };
  } | null;
}

/** The source's tables, columns (name, type, nullability, default) and rows, comparable. */
async function describeDatabase(client: pg.Client): Promise<unknown> {
  const columns = await client.query(
    `SELECT table_name, column_name, data_type, is_nullable, column_default
       FROM information_schema.columns WHERE table_schema = 'public'
      ORDER BY table_name, ordinal_position`,
  );
  const keys = await client.query(
    `SELECT c.relname AS table_name, pg_get_constraintdef(k.oid) AS key
       FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
      WHERE k.contype = 'p' AND c.relnamespace = 'public'::regnamespace ORDER BY 1`,
  );
  const tables = [...new Set(columns.rows.map((r: { table_name: string }) => r.table_name))];
  const rows: Record<string, string[]> = {};
  for (const t of tables) {
    const result = await client.query<{ r: string }>(
      `SELECT t::text AS r FROM "${t}" t ORDER BY 1`,
    );
    rows[t] = result.rows.map((r) => r.r);
  }
  return { columns: columns.rows, keys: keys.rows, rows };
}

/** Replays the buffer into `client`'s database: DDL statements and row changes in order. */
async function replay(client: pg.Client, events: StoredEvent[]): Promise<void> {
  for (const e of events) {
    const table = `"${e.schema_name}"."${e.table_name}"`;
    const record = (image: Record<string, unknown>) =>
      `jsonb_populate_record(NULL::${table}, '${JSON.stringify(image).replace(/'/g, "''")}'::jsonb)`;
    const keyMatch = (image: Record<string, unknown>) =>
      `(${e.primary_key.map((k) => `"${k}"`).join(', ')}) = (SELECT ${e.primary_key
        .map((k) => `"${k}"`)
        .join(', ')} FROM ${record(image)})`;
    switch (e.operation) {
      case 'DDL':
        await client.query(e.details!.statement!);
        break;
      case 'INSERT':
      case 'UPDATE':
        if (e.operation === 'UPDATE')
          await client.query(`DELETE FROM ${table} WHERE ${keyMatch(e.before ?? e.after!)}`);
        await client.query(`INSERT INTO ${table} SELECT * FROM ${record(e.after!)}`);
        // The recipe of docs/events.md: a json column listed here holds JSON null, not SQL NULL.
        for (const column of e.details?.json_null?.after ?? [])
          await client.query(
            `UPDATE ${table} SET "${column}" = 'null' WHERE ${keyMatch(e.after!)}`,
          );
        break;
      case 'DELETE':
        await client.query(`DELETE FROM ${table} WHERE ${keyMatch(e.before!)}`);
        break;
      default:
        throw new Error(`unexpected operation ${e.operation}`);
    }
  }
}

describe('DDL capture', () => {
  let f: Fixture;

  /**
   * One test's own source: a database of its own (its own event trigger), source id and slot, and
   * a Philotes streaming it. Each test starts from nothing and needs no other test before it.
   */
  interface Case {
    id: string;
    slot: string;
    app: pg.Client;
    philotes: PhilotesProcess;
    env: () => Record<string, string>;
    start(): Promise<void>;
    storedEvents(): Promise<StoredEvent[]>;
    waitForMarker(marker: number): Promise<StoredEvent[]>;
  }
  const cases: Case[] = [];

  async function startCase(id: string): Promise<Case> {
    await f.source.createDatabase(id);
    const slot = `slot_${id}`;
    const env = () =>
      f.env({
        PHILOTES_CDC_DDL: 'on',
        PHILOTES_CDC_SOURCE_DATABASE: id,
        PHILOTES_CDC_SOURCE_ID: id,
        PHILOTES_CDC_REPLICATION_SLOT: slot,
      });
    const storedEvents = () =>
      f.buffer.query<StoredEvent>(
        `SELECT lsn::text, seq, operation, schema_name, table_name, before, after, primary_key, details
           FROM cdc_events WHERE source_id = $1 ORDER BY cdc_events.lsn, seq`,
        [id],
        'buffer',
      );
    const c: Case = {
      id,
      slot,
      app: await connect(f.source, id),
      philotes: startPhilotes(env()),
      env,
      async start() {
        c.philotes = startPhilotes(env());
        await waitForSlotActive(f.source, slot);
      },
      storedEvents,
      waitForMarker: (marker) =>
        waitFor(
          async () => {
            const events = await storedEvents();
            return events.some((e) => e.table_name === 'marker' && e.after?.['id'] === marker)
              ? events
              : false;
          },
          { what: `marker ${marker} of ${id} in the buffer`, timeoutMs: 60_000 },
        ),
    };
    cases.push(c);
    await waitForSlotActive(f.source, slot);
    return c;
  }

  beforeAll(async () => {
    f = await startFixture();
  });

  afterEach(async () => {
    for (const c of cases.splice(0)) {
      await c.app.end();
      await c.philotes.kill9();
    }
  });

  afterAll(async () => {
    await f?.destroy();
  });

  it('stores DDL in order with the rows, and a replay of the buffer rebuilds schema and data', async () => {
    const c = await startCase('ordered');
    const app = c.app;
    const statements = [
      'CREATE TABLE marker (id int PRIMARY KEY)',
      'CREATE TABLE acct (id serial PRIMARY KEY, name text NOT NULL, amount int DEFAULT 0)',
      "INSERT INTO acct (name, amount) VALUES ('a', 1), ('b', 2), ('c', 3)",
      // DDL and DML in one transaction.
      'BEGIN',
      'ALTER TABLE acct ADD COLUMN note text',
      "INSERT INTO acct (name, amount, note) VALUES ('d', 4, 'with note')",
      "UPDATE acct SET note = 'later' WHERE name = 'a'",
      'COMMIT',
      'ALTER TABLE acct RENAME COLUMN name TO title',
      "UPDATE acct SET title = 'B' WHERE id = 2",
      'ALTER TABLE acct ALTER COLUMN amount TYPE bigint',
      "INSERT INTO acct (title, amount) VALUES ('e', 9000000000)",
      'ALTER TABLE acct DROP COLUMN note',
      'DELETE FROM acct WHERE id = 3',
      'CREATE TABLE pair (a int, b text, v jsonb, PRIMARY KEY (a, b))',
      `INSERT INTO pair VALUES (1, 'x', '{"k": [1, 2]}'), (2, 'y', 'null')`,
      'CREATE TABLE gone (k text PRIMARY KEY)',
      "INSERT INTO gone VALUES ('z')",
      'DROP TABLE gone',
      'BEGIN',
      'CREATE TABLE born (id int PRIMARY KEY, v text)',
      "INSERT INTO born VALUES (1, 'one')",
      'ALTER TABLE born ADD COLUMN w int',
      "INSERT INTO born VALUES (2, 'two', 2)",
      'COMMIT',
      'CREATE TEMP TABLE scratch (x int)', // temporary: not captured
      'INSERT INTO marker VALUES (1)',
    ];
    for (const sql of statements) await app.query(sql);
    const events = await c.waitForMarker(1);

    const ddl = events.filter((e) => e.operation === 'DDL');
    expect(ddl.map((e) => [e.details!.command_tag, e.table_name])).toEqual([
      ['CREATE TABLE', 'marker'],
      ['CREATE TABLE', 'acct'],
      ['ALTER TABLE', 'acct'],
      ['ALTER TABLE', 'acct'],
      ['ALTER TABLE', 'acct'],
      ['ALTER TABLE', 'acct'],
      ['CREATE TABLE', 'pair'],
      ['CREATE TABLE', 'gone'],
      ['DROP TABLE', 'gone'],
      ['CREATE TABLE', 'born'],
      ['ALTER TABLE', 'born'],
    ]);
    expect(ddl.map((e) => e.details!.statement)).toEqual(
      statements.filter((s) => /^(CREATE TABLE|ALTER|DROP)/.test(s)),
    );
    // The ADD COLUMN shares its transaction (commit LSN) with the rows around it, in order.
    const addNote = ddl[2]!;
    const sameTx = events.filter((e) => e.lsn === addNote.lsn);
    expect(sameTx.map((e) => [e.operation, e.seq])).toEqual([
      ['DDL', 1],
      ['INSERT', 2],
      ['UPDATE', 3],
    ]);

    // Replay into an empty database and compare with the source.
    await f.source.createDatabase('ordered_replayed');
    const target = await connect(f.source, 'ordered_replayed');
    try {
      await replay(target, events);
      await app.query('DISCARD TEMP');
      expect(await describeDatabase(target)).toEqual(await describeDatabase(app));
    } finally {
      await target.end();
    }

    // Each schema version names the DDL that made it.
    const history = await f.buffer.query<{ version: number; ddl: Record<string, unknown> | null }>(
      `SELECT version, ddl FROM cdc_schema_history
        WHERE source_id = $1 AND table_name = 'acct' ORDER BY version`,
      [c.id],
      'buffer',
    );
    expect(history.map((h) => h.ddl?.['statement'])).toEqual([
      'CREATE TABLE acct (id serial PRIMARY KEY, name text NOT NULL, amount int DEFAULT 0)',
      'ALTER TABLE acct ADD COLUMN note text',
      'ALTER TABLE acct RENAME COLUMN name TO title',
      'ALTER TABLE acct ALTER COLUMN amount TYPE bigint',
      'ALTER TABLE acct DROP COLUMN note',
    ]);
    const linked = history[1]!.ddl!;
    expect(events.find((e) => e.lsn === linked['lsn'] && e.seq === linked['seq'])?.operation).toBe(
      'DDL',
    );
  });

  it('DDL keeps working while Philotes is down, and is captured when it is back', async () => {
    const c = await startCase('down');
    await c.app.query('CREATE TABLE marker (id int PRIMARY KEY)');
    await c.app.query('INSERT INTO marker VALUES (1)');
    await c.waitForMarker(1);
    await c.philotes.kill9();
    await c.app.query('CREATE TABLE while_down (id int PRIMARY KEY)');
    await c.app.query('INSERT INTO while_down VALUES (1)');
    c.philotes = startPhilotes(c.env());
    await c.app.query('INSERT INTO marker VALUES (2)');
    const events = await c.waitForMarker(2);
    expect(events.filter((e) => e.table_name === 'while_down').map((e) => e.operation)).toEqual([
      'DDL',
      'INSERT',
    ]);
  });

  it('a trigger dropped while Philotes is down is put back, and the DDL it may have missed is recorded as a gap', async () => {
    const c = await startCase('dropped_down');
    const app = c.app;
    await app.query('CREATE TABLE marker (id int PRIMARY KEY)');
    await app.query('INSERT INTO marker VALUES (1)');
    await c.waitForMarker(1);
    c.philotes.signal('SIGTERM');
    await c.philotes.exited;
    const [cp] = await f.buffer.query<{ lsn: string }>(
      `SELECT lsn FROM cdc_checkpoints WHERE source_id = $1`,
      [c.id],
      'buffer',
    );
    await app.query('DROP EVENT TRIGGER philotes_ddl_command_end');
    await app.query('CREATE TABLE uncaptured (id int PRIMARY KEY)');
    const [after] = (await app.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn'))
      .rows;
    await c.start();
    const gaps = await f.buffer.query<{ from_lsn: string; to_lsn: string }>(
      `SELECT from_lsn::text, to_lsn::text FROM cdc_gaps
        WHERE source_id = $1 AND reason = 'ddl_not_captured'`,
      [c.id],
      'buffer',
    );
    // Exactly once, from the checkpoint to past the uncaptured DDL; the rows are all there.
    expect(gaps).toHaveLength(1);
    expect(gaps[0]!.from_lsn).toBe(cp!.lsn);
    expect(parseLsn(gaps[0]!.to_lsn)).toBeGreaterThanOrEqual(parseLsn(after!.lsn));
    await app.query('INSERT INTO uncaptured VALUES (1)');
    await app.query('INSERT INTO marker VALUES (4)');
    const events = await c.waitForMarker(4);
    expect(events.filter((e) => e.table_name === 'uncaptured').map((e) => e.operation)).toEqual([
      'INSERT',
    ]);
    // A later start with the trigger in place records nothing more.
    c.philotes.signal('SIGTERM');
    await c.philotes.exited;
    await c.start();
    const again = await f.buffer.query(
      `SELECT 1 FROM cdc_gaps WHERE source_id = $1 AND reason = 'ddl_not_captured'`,
      [c.id],
      'buffer',
    );
    expect(again).toHaveLength(1);
  });

  it('a role that may not install the trigger gets a clear error; ddl-trigger installs, prints and removes it', async () => {
    await f.source.createDatabase('app2');
    await f.source.query(`CREATE ROLE plain LOGIN REPLICATION PASSWORD 'plain'`);
    await f.source.query(`GRANT CREATE ON DATABASE app2 TO plain`);
    const plainEnv = {
      ...f.env({ PHILOTES_CDC_DDL: 'on' }),
      PHILOTES_CDC_SOURCE_DATABASE: 'app2',
      PHILOTES_CDC_SOURCE_USER: 'plain',
      PHILOTES_CDC_SOURCE_PASSWORD: 'plain',
      PHILOTES_CDC_SOURCE_ID: 'app2',
      PHILOTES_CDC_REPLICATION_SLOT: 'app2_slot',
    };
    const failed = await runUntilSourceFails(plainEnv);
    expect(failed.stderr.join('\n')).toMatch(/DDL capture .* is not installed.*ddl-trigger/);

    const printed = await runPhilotesToExit({}, 30_000, { args: ['ddl-trigger', '--print'] });
    expect(printed.code).toBe(0);
    expect(printed.stdout.join('\n')).toContain('CREATE EVENT TRIGGER philotes_ddl_command_end');

    // A superuser installs it; the plain role then captures DDL.
    const superEnv = { ...plainEnv, PHILOTES_CDC_SOURCE_USER: f.source.user };
    superEnv.PHILOTES_CDC_SOURCE_PASSWORD = f.source.password;
    const installed = await runPhilotesToExit(superEnv, 30_000, {
      args: ['ddl-trigger', '--source', 'app2'],
    });
    expect(installed.code).toBe(0);
    const triggers = await f.source.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_event_trigger WHERE evtname LIKE 'philotes%'`,
      [],
      'app2',
    );
    expect(triggers[0]!.n).toBe(2);

    const removed = await runPhilotesToExit(superEnv, 30_000, {
      args: ['ddl-trigger', '--source', 'app2', '--remove'],
    });
    expect(removed.code).toBe(0);
    const after = await f.source.query<{ n: number; f: number }>(
      `SELECT (SELECT count(*)::int FROM pg_event_trigger WHERE evtname LIKE 'philotes%') AS n,
              (SELECT count(*)::int FROM pg_proc WHERE proname = 'capture_ddl') AS f`,
      [],
      'app2',
    );
    expect(after[0]).toEqual({ n: 0, f: 0 });
    // DDL still works without it.
    await f.source.query('CREATE TABLE after_removal (id int)', [], 'app2');
  });

  it('a trigger dropped while Philotes runs stops the source loudly; a superuser start puts it back', async () => {
    const c = await startCase('dropped_running');
    const app = c.app;
    await app.query('CREATE TABLE marker (id int PRIMARY KEY)');
    await app.query('INSERT INTO marker VALUES (1)');
    await c.waitForMarker(1);
    const lsnNow = async () =>
      (await app.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]!;
    const beforeDrop = await lsnNow();
    await app.query('DROP EVENT TRIGGER philotes_ddl_command_end');
    await waitFor(
      () =>
        c.philotes.stderr.some(
          (l) => l.includes('DDL capture trigger') && l.includes('removed or disabled'),
        ),
      {
        what: 'the source to fail with DDL_TRIGGER_MISSING',
        timeoutMs: 40_000,
      },
    );
    // The DDL since the trigger was last seen is recorded as possibly missing, before the stop.
    const recorded = await f.buffer.query<{ from_lsn: string; to_lsn: string }>(
      `SELECT from_lsn::text, to_lsn::text FROM cdc_gaps
        WHERE source_id = $1 AND reason = 'ddl_not_captured' ORDER BY id DESC LIMIT 1`,
      [c.id],
      'buffer',
    );
    const droppedAt = await lsnNow();
    // From where the trigger was last seen (before the drop) to past it.
    expect(parseLsn(recorded[0]!.from_lsn)).toBeLessThanOrEqual(parseLsn(beforeDrop!.lsn));
    expect(parseLsn(recorded[0]!.to_lsn)).toBeGreaterThan(parseLsn(beforeDrop!.lsn));
    expect(parseLsn(recorded[0]!.to_lsn)).toBeLessThanOrEqual(parseLsn(droppedAt!.lsn));
    await c.philotes.kill9();
    await c.start();
    const triggers = (
      await app.query<{ evtname: string; evtenabled: string }>(
        `SELECT evtname, evtenabled FROM pg_event_trigger ORDER BY 1`,
      )
    ).rows;
    // Back, and firing also under session_replication_role = replica.
    expect(triggers).toEqual([
      { evtname: 'philotes_ddl_command_end', evtenabled: 'A' },
      { evtname: 'philotes_sql_drop', evtenabled: 'A' },
    ]);
    await app.query('CREATE TABLE after_repair (id int PRIMARY KEY)');
    await app.query('INSERT INTO marker VALUES (3)');
    const events = await c.waitForMarker(3);
    expect(events.some((e) => e.operation === 'DDL' && e.table_name === 'after_repair')).toBe(true);
  });
});
