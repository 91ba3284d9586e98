/**
 * Large values land exactly. Values of a megabyte and more take the by-reference path (framed
 * ahead of pg's parser, placed in the batch without a copy, written to the buffer from the
 * message's own memory); values that need escaping, and json holding \u0000, fall back to the
 * copying path. Each value is compared with the source's by digest.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('large values', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(
      `CREATE TABLE large (id int PRIMARY KEY, t text, b bytea, j jsonb, k json);
       ALTER TABLE large REPLICA IDENTITY FULL;`,
      [],
      'app',
    );
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  it('stores large text, bytea and json values exactly, escaped or not, in both images', async () => {
    await f.source.query(
      `INSERT INTO large VALUES
         (1, repeat('plain ', 700000), decode(repeat('00ff10', 700000), 'hex'),
          (SELECT jsonb_agg(g) FROM generate_series(1, 300000) g),
          ('{"a": "' || repeat('x', 2000000) || '"}')::json),
         (2, repeat(E'quote " and \\\\ and\\nnewline ', 100000), NULL,
          jsonb_build_object('s', repeat('é', 600000)), ('["' || repeat('y', 1500000) || '\\u0000"]')::json),
         (3, repeat('z', 60 * 1024 * 1024), NULL, NULL, NULL);
       UPDATE large SET t = t || 'changed' WHERE id = 1;`,
      [],
      'app',
    );
    const digest = `md5(coalesce(t, '')) || md5(coalesce(b::text, '')) || md5(coalesce(j::text, '')) || md5(coalesce(k::text, ''))`;
    const source = await f.source.query<{ id: number; d: string }>(
      `SELECT id, ${digest} AS d FROM large ORDER BY id`,
      [],
      'app',
    );
    // The buffer's images rebuilt into the source's types, then digested the same way.
    const stored = await waitFor(
      async () => {
        const rows = await f.buffer.query<{
          id: number;
          d: string;
          op: string;
          before_d: string | null;
        }>(
          `WITH e AS (
             SELECT operation AS op, after, before, row_number() OVER (PARTITION BY after->>'id' ORDER BY lsn DESC, seq DESC) AS latest
               FROM cdc_events WHERE source_id = 'app' AND table_name = 'large')
           SELECT (after->>'id')::int AS id, op,
                  md5(coalesce(after->>'t', '')) || md5(coalesce(after->>'b', '')) ||
                  md5(coalesce(after->>'j', '')) || md5(coalesce(after->>'k', '')) AS d,
                  CASE WHEN before IS NULL THEN NULL ELSE md5(before->>'t') END AS before_d
             FROM e WHERE latest = 1 ORDER BY 1`,
          [],
          'buffer',
        );
        return rows.length === 3 && rows[0]!.op === 'UPDATE' ? rows : false;
      },
      { what: 'the large rows', timeoutMs: 120_000 },
    );
    // k (json) is stored as its text: compare its source text the same way.
    const sourceK = await f.source.query<{ id: number; d: string }>(
      `SELECT id, md5(coalesce(t, '')) || md5(coalesce(b::text, '')) || md5(coalesce(j::text, '')) ||
              md5(coalesce(k::text, '')) AS d FROM large ORDER BY id`,
      [],
      'app',
    );
    expect(sourceK).toEqual(source);
    expect(stored.map((r) => ({ id: r.id, d: r.d }))).toEqual(source);
    // The UPDATE's before image (REPLICA IDENTITY FULL) holds the old large text.
    const [old] = await f.source.query<{ d: string }>(
      `SELECT md5(repeat('plain ', 700000)) AS d`,
      [],
      'app',
    );
    expect(stored[0]!.before_d).toBe(old!.d);
  });
});
