/**
 * cdc_schema_history: one version per shape a table takes in the stream (add, drop, retype a
 * column), each at the commit LSN of the first change made in that shape; events in each shape
 * carry exactly its columns; and a restart that finds nothing new records nothing new.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  readEvents,
  startFixture,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

interface HistoryRow {
  version: number;
  columns: Array<{ name: string; type: string; key: boolean }>;
  primary_key: string[];
  lsn: string;
  captured_at: Date;
}

/** Each step: DDL (none for the first), the row inserted afterwards, and the shape it leaves. */
const STEPS: ReadonlyArray<{
  ddl: string | null;
  insert: string;
  columns: Array<[name: string, type: string]>;
  after: Record<string, unknown>;
}> = [
  {
    ddl: null,
    insert: `INSERT INTO evolving VALUES (1, 'one')`,
    columns: [
      ['id', 'int4'],
      ['a', 'text'],
    ],
    after: { id: 1, a: 'one' },
  },
  {
    ddl: 'ALTER TABLE evolving ADD COLUMN b int',
    insert: `INSERT INTO evolving VALUES (2, 'two', 2)`,
    columns: [
      ['id', 'int4'],
      ['a', 'text'],
      ['b', 'int4'],
    ],
    after: { id: 2, a: 'two', b: 2 },
  },
  {
    ddl: 'ALTER TABLE evolving DROP COLUMN a',
    insert: `INSERT INTO evolving VALUES (3, 3)`,
    columns: [
      ['id', 'int4'],
      ['b', 'int4'],
    ],
    after: { id: 3, b: 3 },
  },
  {
    ddl: 'ALTER TABLE evolving ALTER COLUMN b TYPE bigint',
    insert: `INSERT INTO evolving VALUES (4, 4)`,
    columns: [
      ['id', 'int4'],
      ['b', 'int8'],
    ],
    // int8 travels as a string: the retyped column's events say so.
    after: { id: 4, b: '4' },
  },
];

describe('schema history', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;

  const history = (table = 'evolving'): Promise<HistoryRow[]> =>
    f.buffer.query<HistoryRow>(
      `SELECT version, columns, primary_key, lsn, captured_at FROM cdc_schema_history
        WHERE source_id = 'app' AND schema_name = 'public' AND table_name = $1
        ORDER BY version`,
      [table],
      'buffer',
    );

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query('CREATE TABLE evolving (id int PRIMARY KEY, a text)', [], 'app');
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await f?.destroy();
  });

  it('records versions 1-4 (create, add, drop, retype) at the LSN where each shape starts', async () => {
    for (const step of STEPS) {
      if (step.ddl) await f.source.query(step.ddl, [], 'app');
      await f.source.query(step.insert, [], 'app');
    }
    await waitForCatchUp(f, 60_000);

    const events = await readEvents(f.buffer, 'app', 'evolving');
    expect(events.map((e) => e.after)).toEqual(STEPS.map((s) => s.after));
    // Exactly the shape's columns (as sets: jsonb keeps keys in its own order).
    expect(events.map((e) => Object.keys(e.after!).sort())).toEqual(
      STEPS.map((s) => s.columns.map(([name]) => name).sort()),
    );
    for (const e of events) expect(e.primary_key).toEqual(['id']);

    const versions = await history();
    expect(versions.map((v) => v.version)).toEqual([1, 2, 3, 4]);
    versions.forEach((v, i) => {
      const step = STEPS[i]!;
      expect(
        v.columns.map((c) => [c.name, c.type]),
        `version ${v.version}`,
      ).toEqual(step.columns);
      expect(
        v.columns.map((c) => c.key),
        `version ${v.version} replica identity`,
      ).toEqual(step.columns.map(([name]) => name === 'id'));
      expect(v.primary_key).toEqual(['id']);
    });

    // Each version's LSN is the commit LSN of the transaction whose change first used that shape.
    const [check] = await f.buffer.query<{ matches: boolean[] }>(
      `SELECT array_agg(h.lsn::pg_lsn = e.lsn ORDER BY h.version) AS matches
         FROM cdc_schema_history h
         JOIN cdc_events e ON e.source_id = h.source_id AND e.table_name = h.table_name
                          AND (e.after->>'id')::int = h.version
        WHERE h.source_id = 'app' AND h.table_name = 'evolving'`,
      [],
      'buffer',
    );
    expect(check!.matches).toEqual([true, true, true, true]);
  });

  // A restart re-sends every relation; an unchanged shape must not become a new version. The
  // table is this test's own, in two shapes, so it needs no other test before it.
  it('a restart (SIGTERM, start again) resumes in the same shape and adds no duplicate version', async () => {
    await f.source.query(
      `CREATE TABLE restarted (id int PRIMARY KEY, a text);
       INSERT INTO restarted VALUES (1, 'one');
       ALTER TABLE restarted ADD COLUMN b int;
       INSERT INTO restarted VALUES (2, 'two', 2);`,
      [],
      'app',
    );
    await waitForCatchUp(f, 60_000);
    const beforeRestart = await history('restarted');
    expect(beforeRestart.map((v) => v.version)).toEqual([1, 2]);

    philotes.signal('SIGTERM');
    const exit = await waitFor(() => philotes.exited, {
      what: 'philotes to exit after SIGTERM',
      timeoutMs: 30_000,
    });
    expect(exit, philotes.stderr.join('\n')).toEqual({ code: 0, signal: null });

    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    // A change makes the new walsender send the table's Relation message again, describing
    // version 2's shape.
    await f.source.query(`INSERT INTO restarted VALUES (3, 'three', 3)`, [], 'app');
    await waitForCatchUp(f, 60_000);

    const events = await readEvents(f.buffer, 'app', 'restarted');
    expect(events.map((e) => e.after)).toEqual([
      { id: 1, a: 'one' },
      { id: 2, a: 'two', b: 2 },
      { id: 3, a: 'three', b: 3 },
    ]);
    expect(await history('restarted')).toEqual(beforeRestart);
  });
});
