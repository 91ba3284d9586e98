import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  readEvents,
  startFixture,
  startLoad,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';

describe('capture one source', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;

  /** The table's events, in order, once the source is caught up: after and details. */
  const jsonNullEvents = async (table: string) => {
    await waitForCatchUp(f);
    return f.buffer.query<{
      after: Record<string, unknown>;
      details: { json_null?: { after?: string[] } } | null;
    }>(
      `SELECT after, details FROM cdc_events
        WHERE source_id = 'app' AND table_name = $1 ORDER BY cdc_events.lsn, seq`,
      [table],
      'buffer',
    );
  };

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    await f.source.query('CREATE TABLE other (id int PRIMARY KEY, note text)', [], 'app');
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await f?.destroy();
  });

  it('stores inserts, updates, deletes and truncates from concurrent clients once, in commit order', async () => {
    const load = startLoad(f.source, { clients: 4, maxTransactions: 300 });
    await f.source.query(
      `INSERT INTO other SELECT g, 'note ' || g FROM generate_series(1, 10) g`,
      [],
      'app',
    );
    await f.source.query('TRUNCATE other', [], 'app');
    const stats = await load.finished();
    expect(stats.committedTransactions).toBeGreaterThanOrEqual(300);
    await waitForCatchUp(f);

    const events = await readEvents(f.buffer);
    const rows = checkItemHistories(events);
    await assertReplayMatchesSource(f.source, rows);

    // The load updates rows with large, incompressible `big` values without touching them: those
    // arrive as unchanged TOAST and must be marked so, never reported as null.
    const toastUpdates = events.filter(
      (e) => e.operation === 'UPDATE' && e.unchanged_columns?.includes('big'),
    );
    expect(toastUpdates.length).toBeGreaterThan(0);
    for (const e of toastUpdates) expect(e.after).not.toHaveProperty('big');

    const other = events.filter((e) => e.table_name === 'other');
    expect(other.map((e) => e.operation)).toEqual([...Array(10).fill('INSERT'), 'TRUNCATE']);
    // Commit order per row is what checkItemHistories verified (versions 0, 1, 2… in lsn order);
    // the replay reproduces the source, and nothing is missing.
    const [count] = await f.source.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM items',
      [],
      'app',
    );
    expect(rows.size).toBe(count!.n);
  });

  it('tells a JSON null from SQL NULL, and the documented replay reproduces both', async () => {
    await f.source.query(
      `CREATE TABLE docs (id int PRIMARY KEY, j jsonb, t json);
       INSERT INTO docs VALUES (1, NULL, NULL), (2, 'null', 'null'), (3, '{"a": null}', '[null]');
       UPDATE docs SET j = 'null' WHERE id = 3;
       UPDATE docs SET j = NULL, t = 'null' WHERE id = 2;`,
      [],
      'app',
    );
    const events = await jsonNullEvents('docs');
    expect(events.map((e) => e.details?.json_null?.after ?? null)).toEqual([
      null,
      ['j', 't'],
      null,
      ['j'],
      ['t'],
    ]);
    // The replay of docs/events.md: the row from `after`, then JSON null for the columns details names.
    const state = new Map<number, { j: unknown; t: unknown }>();
    for (const e of events) {
      const nulls = e.details?.json_null?.after ?? [];
      const value = (column: string) =>
        nulls.includes(column)
          ? 'null'
          : e.after[column] === null
            ? null
            : JSON.stringify(e.after[column]);
      state.set(e.after['id'] as number, { j: value('j'), t: value('t') });
    }
    const source = await f.source.query<{ id: number; j: string | null; t: string | null }>(
      'SELECT id, j::text AS j, t::text AS t FROM docs ORDER BY id',
      [],
      'app',
    );
    const normal = (text: unknown) =>
      text === null ? null : JSON.stringify(JSON.parse(text as string));
    expect(
      [...state.entries()]
        .sort(([a], [b]) => a - b)
        .map(([id, r]) => ({ id, j: normal(r.j), t: normal(r.t) })),
    ).toEqual(source.map((r) => ({ id: r.id, j: normal(r.j), t: normal(r.t) })));
  });

  it('tells JSON null elements of a jsonb[] from NULL elements, and the replay reproduces them', async () => {
    await f.source.query(
      `CREATE TABLE arrs (id int PRIMARY KEY, a jsonb[], b json[]);
       INSERT INTO arrs VALUES
         (1, ARRAY['null', NULL, '{"x": null}']::jsonb[], ARRAY[NULL, ' null ']::json[]),
         (2, ARRAY[['null', '1'], [NULL, 'null']]::jsonb[], NULL),
         (3, ARRAY[NULL]::jsonb[], '{}');`,
      [],
      'app',
    );
    const events = await jsonNullEvents('arrs');
    expect(events.map((e) => e.details?.json_null?.after ?? null)).toEqual([
      ['a[1]', 'b[2]'],
      ['a[1][1]', 'a[2][2]'],
      null,
    ]);
    // The replay of docs/events.md: the row from `after`, then each listed element set to JSON null.
    const scratch = `arrs_${Math.random().toString(36).slice(2, 8)}`;
    await f.source.createDatabase(scratch);
    await f.source.query(
      'CREATE TABLE arrs (id int PRIMARY KEY, a jsonb[], b json[])',
      [],
      scratch,
    );
    for (const e of events) {
      await f.source.query(
        'INSERT INTO arrs SELECT * FROM jsonb_populate_record(NULL::arrs, $1)',
        [JSON.stringify(e.after)],
        scratch,
      );
      for (const path of e.details?.json_null?.after ?? []) {
        const [, column, subscripts] = /^([a-z]+)(.*)$/.exec(path)!;
        await f.source.query(
          `UPDATE arrs SET ${column}${subscripts} = 'null' WHERE id = $1`,
          [e.after['id']],
          scratch,
        );
      }
    }
    const digest = `SELECT id, a::text, regexp_replace(b::text, '[[:space:]]', '', 'g') AS b FROM arrs ORDER BY id`;
    expect(await f.source.query(digest, [], scratch)).toEqual(
      await f.source.query(digest, [], 'app'),
    );
  });

  it("carries a TRUNCATE's options and every table it truncated, CASCADE ones included", async () => {
    await f.source.query(
      `CREATE TABLE parent (id serial PRIMARY KEY);
       CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
       INSERT INTO parent DEFAULT VALUES;
       INSERT INTO child VALUES (1, 1);`,
      [],
      'app',
    );
    await f.source.query('TRUNCATE other, parent RESTART IDENTITY CASCADE', [], 'app');
    await waitForCatchUp(f);
    const truncates = await f.buffer.query<{ table_name: string; details: unknown }>(
      `SELECT table_name, details FROM cdc_events
        WHERE source_id = 'app' AND operation = 'TRUNCATE' AND details->>'cascade' = 'true'
        ORDER BY seq`,
      [],
      'buffer',
    );
    const tables = ['public.other', 'public.parent', 'public.child'];
    expect(truncates.map((t) => t.table_name).sort()).toEqual(['child', 'other', 'parent']);
    for (const t of truncates) {
      expect(t.details).toMatchObject({ cascade: true, restart_identity: true });
      expect([...(t.details as { tables: string[] }).tables].sort()).toEqual([...tables].sort());
    }
    // The earlier plain TRUNCATE says so too.
    const [plain] = await f.buffer.query<{ details: unknown }>(
      `SELECT details FROM cdc_events WHERE source_id = 'app' AND operation = 'TRUNCATE' ORDER BY lsn LIMIT 1`,
      [],
      'buffer',
    );
    expect(plain!.details).toEqual({
      cascade: false,
      restart_identity: false,
      tables: ['public.other'],
    });
  });
});
