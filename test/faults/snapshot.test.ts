/**
 * The initial snapshot (issue 12), on the default `snapshot: initial`: a source with existing
 * rows over several tables (a composite key, a wide TOASTed column, a keyless table) and writers
 * updating, deleting and inserting during the copy, with a kill -9 in its middle. The buffer,
 * replayed in (lsn, seq) order — SNAPSHOT as an upsert of the row's state, UPDATE of a key not
 * seen yet as an upsert of `after`, DELETE of one as nothing — equals every keyed table.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('initial snapshot', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  const env = () =>
    f.env({
      PHILOTES_CDC_SNAPSHOT: 'initial',
      PHILOTES_CDC_SNAPSHOT_CHUNK_ROWS: '2000',
      PHILOTES_CDC_SNAPSHOT_PARALLEL_TABLES: '2',
    });

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(
      `CREATE TABLE people (id int PRIMARY KEY, name text, n int);
       INSERT INTO people SELECT g, 'p' || g, 0 FROM generate_series(1, 60000) g;
       CREATE TABLE lines (o int, l text, qty int, PRIMARY KEY (o, l));
       INSERT INTO lines SELECT g / 10, 'line ' || (g % 10), g FROM generate_series(1, 30000) g;
       CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
       ALTER TABLE docs ALTER body SET STORAGE EXTERNAL; -- out of line, uncompressed
       INSERT INTO docs SELECT g, 0, repeat(md5(g::text), 100) FROM generate_series(1, 6000) g;
       CREATE TABLE nokey (x int);
       INSERT INTO nokey SELECT g FROM generate_series(1, 10) g;`,
      [],
      'app',
    );
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  it('copies existing rows while writers change them, survives a kill -9, and replays exactly', async () => {
    philotes = startPhilotes(env());
    await waitForSlotActive(f.source);
    const writer = await connect(f.source, 'app');
    let stop = false;
    let i = 0;
    const load = (async () => {
      while (!stop) {
        i++;
        await writer.query('UPDATE people SET n = n + 1 WHERE id = $1', [1 + ((i * 7919) % 60000)]);
        await writer.query('DELETE FROM lines WHERE o = $1', [(i * 31) % 3000]);
        await writer.query(`INSERT INTO people VALUES ($1, 'new', 0) ON CONFLICT DO NOTHING`, [
          100000 + i,
        ]);
      }
    })();
    // Updates that leave the TOASTed body alone: the stream does not carry it (the TOAST catch).
    const docsWriter = await connect(f.source, 'app');
    const docsLoad = (async () => {
      let j = 0;
      while (!stop) {
        j++;
        await docsWriter.query('UPDATE docs SET n = n + 1 WHERE id = $1', [1 + ((j * 37) % 6000)]);
      }
    })();
    // Kill it in the middle of the copy, then let it resume.
    await waitFor(
      async () =>
        Number(
          (
            await f.buffer
              .query<{ n: string }>(
                `SELECT coalesce(sum(rows), 0) AS n FROM cdc_snapshot_tables`,
                [],
                'buffer',
              )
              .catch(() => [{ n: '0' }])
          )[0]!.n,
        ) > 20000,
      { what: 'part of the snapshot', timeoutMs: 60_000 },
    );
    await philotes.kill9();
    philotes = startPhilotes(env());
    await waitFor(
      async () =>
        (
          await f.buffer.query<{ state: string }>(`SELECT state FROM cdc_snapshots`, [], 'buffer')
        )[0]?.state === 'done',
      { what: 'the snapshot to finish', timeoutMs: 120_000 },
    );
    stop = true;
    await load;
    await docsLoad;
    await docsWriter.end();
    await writer.query(`INSERT INTO people VALUES (0, 'marker', 0)`);
    await writer.end();
    await waitFor(
      async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'people' AND (after->>'id')::int = 0`,
            [],
            'buffer',
          )
        )[0]!.n === 1,
      { what: 'the marker', timeoutMs: 60_000 },
    );

    for (const [table, key] of [
      ['people', ['id']],
      ['lines', ['o', 'l']],
      ['docs', ['id']],
    ] as const) {
      const events = await f.buffer.query<{
        operation: string;
        before: Record<string, unknown> | null;
        after: Record<string, unknown> | null;
        unchanged_columns: string[] | null;
      }>(
        `SELECT operation, before, after, unchanged_columns FROM cdc_events
          WHERE table_name = $1 ORDER BY cdc_events.lsn, seq`,
        [table],
        'buffer',
      );
      const k = (row: Record<string, unknown>) => key.map((c) => String(row[c])).join('|');
      const state = new Map<string, Record<string, unknown>>();
      for (const e of events) {
        if (e.operation === 'DELETE') state.delete(k(e.before!));
        else {
          const prior = state.get(k(e.after!)) ?? {};
          state.set(k(e.after!), { ...prior, ...e.after });
        }
      }
      const source = await f.source.query<Record<string, unknown>>(
        `SELECT * FROM ${table}`,
        [],
        'app',
      );
      expect(state.size, table).toBe(source.length);
      for (const row of source) {
        expect(state.get(k(row)), `${table} ${k(row)}`).toEqual(
          Object.fromEntries(Object.entries(row).map(([c, v]) => [c, v])),
        );
      }
    }
    // No row copied twice: one SNAPSHOT per key at most.
    const [twice] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM (
         SELECT table_name, after->>'id', after->>'o', after->>'l' FROM cdc_events
          WHERE operation = 'SNAPSHOT' GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) t`,
      [],
      'buffer',
    );
    expect(twice!.n).toBe(0);
    const [nokey] = await f.buffer.query<{ state: string }>(
      `SELECT state FROM cdc_snapshot_tables WHERE table_name = 'nokey'`,
      [],
      'buffer',
    );
    expect(nokey!.state).toBe('skipped_no_key');
  });
});
