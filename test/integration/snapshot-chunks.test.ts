/**
 * The snapshot's chunk query against a real server: it walks a table with a composite key of
 * mixed types in key order, chunk after chunk, every row once, and prints values exactly as
 * pgoutput does (the replication session settings), so that keys compare with the stream's.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import pg from 'pg';
import { startCluster, type Cluster } from '../support/cluster.js';
import { chunkQuery, type ChunkTable } from '../../workers/snapshot/chunk-query.js';

describe('snapshot chunk query', () => {
  let cluster: Cluster;
  let client: pg.Client;

  beforeAll(async () => {
    cluster = await startCluster();
    await cluster.createDatabase('app');
    client = new pg.Client({
      connectionString: cluster.url('app'),
      options:
        '-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c bytea_output=hex -c extra_float_digits=3',
    });
    await client.connect();
    await client.query(`
      CREATE TABLE lines (at timestamptz, code text, n int, note text, PRIMARY KEY (at, code, n));
      INSERT INTO lines
        SELECT timestamptz '2026-01-01 00:00:00+00' + (g % 7) * interval '1.5 second',
               chr(65 + g % 3) || ' é', g, 'row ' || g
          FROM generate_series(1, 1000) g;`);
  });

  afterAll(async () => {
    await client?.end();
    await cluster?.destroy();
  });

  it('walks a composite key of mixed types in chunks: every row once, in key order', async () => {
    const types = await client.query<{ t: string }>(
      `SELECT format_type(a.atttypid, a.atttypmod) AS t
         FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = 'lines'::regclass AND i.indisprimary ORDER BY k.ord`,
    );
    const table: ChunkTable = {
      schema: 'public',
      table: 'lines',
      columns: ['at', 'code', 'n', 'note'],
      primaryKey: ['at', 'code', 'n'],
      primaryKeyTypes: types.rows.map((r) => r.t),
    };
    const seen: string[] = [];
    let after: string[] | null = null;
    let chunks = 0;
    for (;;) {
      const q = chunkQuery(table, after, 64);
      const result = await client.query({ text: q.text, values: q.values, rowMode: 'array' });
      chunks++;
      const rows = result.rows as string[][];
      for (const row of rows) seen.push(row.slice(0, 3).join('|'));
      if (rows.length < 64) break;
      after = rows[rows.length - 1]!.slice(0, 3);
    }
    expect(chunks).toBe(16);
    const all = await client.query<{ k: string }>(
      `SELECT at::text || '|' || code || '|' || n::text AS k FROM lines ORDER BY at, code, n`,
    );
    expect(seen).toEqual(all.rows.map((r) => r.k));
    // Printed as pgoutput prints them (ISO, UTC, microseconds when there are any).
    expect(seen[1]).toMatch(/^2026-01-01 00:00:00\+00\|[ABC] é\|\d+$/);
  });
});
