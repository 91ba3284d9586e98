/**
 * An on-demand snapshot (issue 12): `philotes-worker snapshot --source S --table T` while the
 * source streams and writers change both tables. The source runs with `snapshot: never`, so the
 * buffer holds none of the table's existing rows until the on-demand copy: replayed, it equals
 * the table only if that copy met the stream exactly. The other table streams on meanwhile.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  connect,
  startFixture,
  waitForSlotActive,
  writeUntilStopped,
  type Fixture,
} from '../support/fixture.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('on-demand snapshot', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  const env = () => f.env({ PHILOTES_CDC_SNAPSHOT_CHUNK_ROWS: '500' });
  const b = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.buffer.query<T>(sql, params, 'buffer');

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(
      `CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);
       INSERT INTO accounts SELECT g, 'o' || g, 100 FROM generate_series(1, 8000) g;
       CREATE TABLE audit (id serial PRIMARY KEY, note text);`,
      [],
      'app',
    );
  });

  // Every test asks a running Philotes for its snapshot, whichever test ran before.
  beforeEach(async () => {
    if (philotes && philotes.status() === null) return;
    philotes = startPhilotes(env());
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  async function replay(table: string): Promise<Map<number, Record<string, unknown>>> {
    const events = await b<{
      operation: string;
      before: Record<string, unknown> | null;
      after: Record<string, unknown> | null;
    }>(
      `SELECT operation, before, after FROM cdc_events WHERE table_name = $1
        ORDER BY cdc_events.lsn, seq`,
      [table],
    );
    const state = new Map<number, Record<string, unknown>>();
    for (const e of events) {
      if (e.operation === 'DELETE') state.delete(Number(e.before!['id']));
      else state.set(Number(e.after!['id']), { ...state.get(Number(e.after!['id'])), ...e.after });
    }
    return state;
  }

  it('re-copies one table while writers change it and the other table streams on', async () => {
    // A table name the publication does not have is refused, naming what it has.
    const wrong = await runPhilotesToExit(env(), 60_000, {
      args: ['snapshot', '--source', 'app', '--table', 'acounts'],
    });
    expect(wrong.code).toBe(2);
    expect(wrong.stderr.join('\n')).toContain('public.acounts');
    expect(wrong.stderr.join('\n')).toContain('public.accounts');

    const writer = await connect(f.source, 'app');
    const load = writeUntilStopped(async (i) => {
      await writer.query('UPDATE accounts SET balance = balance + 1 WHERE id = $1', [
        1 + ((i * 7919) % 8000),
      ]);
      await writer.query('DELETE FROM accounts WHERE id = $1', [1 + ((i * 104729) % 8000)]);
      await writer.query(`INSERT INTO accounts VALUES ($1, 'new', 0)`, [10000 + i]);
      await writer.query(`INSERT INTO audit (note) VALUES ($1)`, [`n${i}`]);
    });
    await waitFor(async () => load.rounds() > 50, {
      what: 'the writers to start',
      timeoutMs: 30_000,
    });

    const asked = await runPhilotesToExit(env(), 60_000, {
      args: ['snapshot', '--source', 'app', '--table', 'accounts'],
    });
    expect(asked.code, asked.stderr.join('\n')).toBe(0);
    const id = /snapshot #(\d+) of public\.accounts/.exec(asked.stdout.join('\n'))?.[1];
    expect(id, asked.stdout.join('\n')).toBeDefined();

    await waitFor(
      async () =>
        (await b<{ state: string }>(`SELECT state FROM cdc_snapshots WHERE id = $1`, [id]))[0]
          ?.state === 'done',
      { what: 'the on-demand snapshot to finish', timeoutMs: 120_000 },
    );
    await load.stop();
    await writer.query(`INSERT INTO audit (note) VALUES ('marker')`);
    await writer.end();
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE after->>'note' = 'marker'`,
          )
        )[0]!.n === 1,
      { what: 'the marker', timeoutMs: 60_000 },
    );

    for (const table of ['accounts', 'audit']) {
      const source = await f.source.query<Record<string, unknown>>(
        `SELECT * FROM ${table}`,
        [],
        'app',
      );
      const state = await replay(table);
      expect(state.size, table).toBe(source.length);
      for (const row of source) expect(state.get(Number(row['id'])), table).toEqual(row);
    }

    // Only the asked-for table was copied, each of its rows once, and the other table's changes
    // kept landing while the copy ran (between its first and last SNAPSHOT rows). (The other
    // tests copy tables of their own.)
    const tables = await b<{ table_name: string }>(
      `SELECT table_name FROM cdc_snapshot_tables WHERE snapshot_id = $1`,
      [id],
    );
    expect(tables.map((t) => t.table_name)).toEqual(['accounts']);
    const [copied] = await b<{ rows: number; twice: number; between: number }>(
      `SELECT count(*)::int AS rows,
              count(*)::int - count(DISTINCT after->>'id')::int AS twice,
              (SELECT count(*)::int FROM cdc_events a WHERE a.table_name = 'audit'
                  AND a.lsn > min(s.lsn) AND a.lsn < max(s.lsn)) AS between
         FROM cdc_events s WHERE operation = 'SNAPSHOT' AND table_name = 'accounts'`,
    );
    expect(copied!.twice).toBe(0);
    expect(copied!.rows).toBeGreaterThan(7000);
    expect(copied!.between).toBeGreaterThan(0);
    const [record] = await b<{ state: string; rows: string; chunks: number }>(
      `SELECT state, rows, chunks FROM cdc_snapshot_tables WHERE snapshot_id = $1`,
      [id],
    );
    expect(record).toMatchObject({ state: 'done', rows: String(copied!.rows) });
    expect(record!.chunks).toBeGreaterThanOrEqual(16);
  });

  it('reads table names as PostgreSQL does: a quoted mixed-case name, and one without its schema', async () => {
    await f.source.query(
      `CREATE TABLE "Ledger" (id int PRIMARY KEY, memo text);
       INSERT INTO "Ledger" SELECT g, 'm' || g FROM generate_series(1, 30) g;`,
      [],
      'app',
    );
    const asked = await runPhilotesToExit(env(), 60_000, {
      args: ['snapshot', '--source', 'app', '--table', '"Ledger"', '--table', 'public."Ledger"'],
    });
    expect(asked.code, asked.stderr.join('\n')).toBe(0);
    expect(asked.stdout.join('\n')).toMatch(/snapshot #\d+ of public\.Ledger asked for/);
    await waitFor(
      async () =>
        (
          await b<{ state: string }>(
            `SELECT t.state FROM cdc_snapshot_tables t WHERE t.table_name = 'Ledger'`,
          )
        )[0]?.state === 'done',
      { what: 'the quoted table to be copied', timeoutMs: 60_000 },
    );
    const [copied] = await b<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'Ledger' AND operation = 'SNAPSHOT'`,
    );
    expect(copied!.n).toBe(30);
  });

  it('from SQL: a table the publication does not have is recorded as not_published, and the snapshot ends', async () => {
    const [{ id }] = (await b<{ id: string }>(
      `SELECT philotes_request_snapshot('app', ARRAY['public.audit', 'nowhere']) AS id`,
    )) as [{ id: string }];
    await waitFor(
      async () =>
        (await b<{ state: string }>(`SELECT state FROM cdc_snapshots WHERE id = $1`, [id]))[0]
          ?.state === 'done',
      { what: 'the SQL-requested snapshot to finish', timeoutMs: 60_000 },
    );
    const tables = await b<{ table_name: string; state: string }>(
      `SELECT table_name, state FROM cdc_snapshot_tables WHERE snapshot_id = $1 ORDER BY 1`,
      [id],
    );
    expect(tables).toEqual([
      { table_name: 'audit', state: 'done' },
      { table_name: 'nowhere', state: 'not_published' },
    ]);
    await expect(b(`SELECT philotes_request_snapshot('app', ARRAY['a.b.c'])`)).rejects.toThrow(
      'not schema.table',
    );
  });

  it('a table dropped while it is being copied ends the snapshot, and the source streams on', async () => {
    await f.source.query(
      `CREATE TABLE bulk (id int PRIMARY KEY, v text);
       INSERT INTO bulk SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g;`,
      [],
      'app',
    );
    const [{ id }] = (await b<{ id: string }>(
      `SELECT philotes_request_snapshot('app', ARRAY['bulk']) AS id`,
    )) as [{ id: string }];
    await waitFor(
      async () =>
        Number(
          (
            await b<{ rows: string }>(
              `SELECT coalesce(sum(rows), 0) AS rows FROM cdc_snapshot_tables WHERE snapshot_id = $1`,
              [id],
            )
          )[0]!.rows,
        ) > 2000,
      { what: 'part of the copy', timeoutMs: 60_000, intervalMs: 20 },
    );
    await f.source.query('DROP TABLE bulk', [], 'app');
    await waitFor(
      async () =>
        (await b<{ state: string }>(`SELECT state FROM cdc_snapshots WHERE id = $1`, [id]))[0]
          ?.state === 'done',
      { what: 'the snapshot to end', timeoutMs: 60_000 },
    );
    const [table] = await b<{ state: string; rows: string }>(
      `SELECT state, rows FROM cdc_snapshot_tables WHERE snapshot_id = $1`,
      [id],
    );
    expect(table!.state).toBe('not_published');
    expect(Number(table!.rows)).toBeLessThan(200_000);
    await f.source.query(`INSERT INTO audit (note) VALUES ('after the drop')`, [], 'app');
    await waitFor(
      async () =>
        (
          await b<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE after->>'note' = 'after the drop'`,
          )
        )[0]!.n === 1,
      { what: 'a change after the drop', timeoutMs: 60_000 },
    );
  });
});
