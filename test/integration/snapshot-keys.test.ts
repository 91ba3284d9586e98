/**
 * What a snapshot reads a table's chunks by, when the table has no primary key or its replica
 * identity is another index (issue 19): a unique index on NOT NULL columns stands in for the key,
 * the replica identity index first (its columns are in every change the stream carries). Rows
 * change while the copy runs (tiny chunks, so that it takes many windows); replayed by that key,
 * the buffer equals each table. A table with no such index is recorded skipped_no_key.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, startFixture, writeUntilStopped, type Fixture } from '../support/fixture.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('snapshot keys other than a primary key', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  const b = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.buffer.query<T>(sql, params, 'buffer');

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(
      `-- No primary key, no replica identity: insert-only (the source refuses the rest).
       CREATE TABLE uq (code text NOT NULL, v text, UNIQUE (code));
       INSERT INTO uq SELECT 'c' || g, 'orig' FROM generate_series(1, 3000) g;
       -- A primary key, but the replica identity is another index: a DELETE carries only it.
       CREATE TABLE ri (id int PRIMARY KEY, code int NOT NULL, v text);
       CREATE UNIQUE INDEX ri_code ON ri (code);
       ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code;
       INSERT INTO ri SELECT g, 100000 - g, 'orig' FROM generate_series(1, 3000) g;
       -- Nothing to read chunks by.
       CREATE TABLE bare (v text);
       INSERT INTO bare SELECT 'x' FROM generate_series(1, 10);`,
      [],
      'app',
    );
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  async function replay(table: string, key: string): Promise<Map<string, string>> {
    const events = await b<{
      operation: string;
      before: Record<string, unknown> | null;
      after: Record<string, unknown> | null;
    }>(`SELECT operation, before, after FROM cdc_events WHERE table_name = $1 ORDER BY lsn, seq`, [
      table,
    ]);
    const state = new Map<string, string>();
    for (const e of events) {
      if (e.operation === 'DELETE') state.delete(String(e.before![key]));
      else if (e.operation === 'UPDATE' && e.before) {
        state.delete(String(e.before[key]));
        state.set(String(e.after![key]), String(e.after!['v']));
      } else state.set(String(e.after![key]), String(e.after!['v']));
    }
    return state;
  }

  it('copies tables by a unique index while they change, and says which table it cannot copy', async () => {
    philotes = startPhilotes(
      f.env({
        PHILOTES_CDC_SNAPSHOT: 'initial',
        PHILOTES_CDC_SNAPSHOT_CHUNK_ROWS: '100',
        // uq and bare have no primary key: published as they are, to see what a snapshot reads.
        PHILOTES_CDC_KEYLESS_TABLES: 'accept',
      }),
    );
    const writer = await connect(f.source, 'app');
    const load = writeUntilStopped(async (i) => {
      await writer.query(`INSERT INTO uq VALUES ($1, 'new')`, [`n${i}`]);
      await writer.query(`UPDATE ri SET v = 'changed' || $2 WHERE code = $1`, [
        100000 - (1 + ((i * 7919) % 3000)),
        i,
      ]);
      await writer.query(`DELETE FROM ri WHERE code = $1`, [100000 - (1 + ((i * 104729) % 3000))]);
    });
    await waitFor(
      async () =>
        (await b<{ state: string }>(`SELECT state FROM cdc_snapshots WHERE reason = 'initial'`))[0]
          ?.state === 'done',
      { what: 'the initial snapshot to finish', timeoutMs: 120_000 },
    );
    const rounds = await load.stop();
    await writer.query(`INSERT INTO uq VALUES ('marker', 'm')`);
    await writer.end();
    await waitFor(async () => (await replay('uq', 'code')).has('marker'), {
      what: 'the marker',
      timeoutMs: 60_000,
    });
    expect(rounds, 'the writers ran during the copy').toBeGreaterThan(20);

    const uq = await f.source.query<{ code: string; v: string }>(
      'SELECT code, v FROM uq',
      [],
      'app',
    );
    expect(await replay('uq', 'code')).toEqual(new Map(uq.map((r) => [r.code, r.v])));
    const ri = await f.source.query<{ code: number; v: string }>(
      'SELECT code, v FROM ri',
      [],
      'app',
    );
    expect(await replay('ri', 'code')).toEqual(new Map(ri.map((r) => [String(r.code), r.v])));

    const tables = await b<{ table_name: string; state: string }>(
      `SELECT table_name, state FROM cdc_snapshot_tables ORDER BY table_name`,
    );
    expect(tables.filter((t) => ['bare', 'ri', 'uq'].includes(t.table_name))).toEqual([
      { table_name: 'bare', state: 'skipped_no_key' },
      { table_name: 'ri', state: 'done' },
      { table_name: 'uq', state: 'done' },
    ]);
    // check says so beforehand, naming the table it cannot copy and only that one.
    const check = await runPhilotesToExit(
      f.env({ PHILOTES_CDC_SNAPSHOT: 'initial', PHILOTES_CDC_KEYLESS_TABLES: 'accept' }),
      60_000,
      {
        args: ['check', '--json'],
      },
    );
    const findings = (
      JSON.parse(check.stdout.join('\n')) as { findings: Array<Record<string, unknown>> }
    ).findings;
    const snapshot = findings.find((x) => x['check'] === 'snapshot');
    expect(snapshot?.['verdict']).toBe('warning');
    expect(String(snapshot?.['detail'])).toMatch(/cannot copy public\.bare: /);
  });
});
