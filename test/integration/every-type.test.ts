/**
 * Every type a table can have on the server: each base, range and multirange type in pg_catalog
 * (read from the server itself, so a type a new version adds fails this test until it has a
 * value here), an array of each, and a domain, an enum, a composite, a range and a multirange of
 * our own, with edge values. Rows copied by the initial snapshot and rows streamed both replay
 * (jsonb_populate_record) to exactly the source's values, and no value stops capture.
 * int2vector and oidvector print as space-separated numbers although their category is array.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, startFixture, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

/**
 * SQL expressions of each type's values (cast to the type by the test); row k takes value k,
 * cycling. An empty list: the type's values cannot be written from SQL (no input function, and
 * no catalog holds one the test can copy), so only NULL is tested.
 */
const VALUES: Record<string, readonly string[]> = {
  bool: [`'true'`, `'false'`],
  bytea: [`'\\x00ff5c22'`, `''`],
  char: [`'a'`, `'"'`],
  name: [`'a name with "quotes" and \\ backslash'`],
  int8: [`'9223372036854775807'`, `'-9223372036854775808'`],
  int2: [`'32767'`, `'-32768'`],
  int2vector: [`'1 2 3 4 5 6 7 8'`, `''`],
  int4: [`'2147483647'`, `'-2147483648'`],
  regproc: [`'now'`],
  text: [`'line' || chr(10) || 'tab' || chr(9) || '"q" \\ ☃'`, `''`],
  oid: [`'4294967295'`, `'0'`],
  tid: [`'(4294967295,65535)'`],
  xid: [`'4294967295'`],
  cid: [`'4294967295'`],
  oidvector: [`'1 2 4294967295'`, `''`],
  pg_ddl_command: [],
  // JSON null (a json value that reads like SQL NULL) is the types test's: details.json_null.
  json: [`'{"big": 12345678901234567890.123, "s": "x"}'`, `'[1, "two", {}]'`],
  xml: [`'<a b="c">t&amp;</a>'`],
  pg_node_tree: [`(SELECT adbin FROM pg_attrdef LIMIT 1)`],
  pg_ndistinct: [`(SELECT stxdndistinct FROM pg_statistic_ext_data LIMIT 1)`],
  pg_dependencies: [`(SELECT stxddependencies FROM pg_statistic_ext_data LIMIT 1)`],
  pg_mcv_list: [`(SELECT stxdmcv FROM pg_statistic_ext_data LIMIT 1)`],
  xid8: [`'18446744073709551615'`, `'0'`],
  point: [`'(1.5,-2)'`, `'(NaN,Infinity)'`],
  lseg: [`'[(0,0),(1,1)]'`],
  path: [`'[(0,0),(1,1),(2,0)]'`, `'((0,0),(1,1))'`],
  box: [`'(1,1),(0,0)'`],
  polygon: [`'((0,0),(1,1),(1,0))'`],
  line: [`'{1,-1,0}'`],
  float4: [`'3.4028235e38'`, `'-0'`, `'NaN'`, `'-Infinity'`],
  float8: [`'1.7976931348623157e308'`, `'-0'`, `'NaN'`, `'5e-324'`],
  circle: [`'<(1,2),3>'`],
  money: [`'-92233720368547758.08'`, `'92233720368547758.07'`],
  macaddr: [`'08:00:2b:01:02:03'`],
  inet: [`'192.168.0.1/24'`, `'::1'`],
  cidr: [`'10.0.0.0/8'`, `'2001:db8::/32'`],
  macaddr8: [`'08:00:2b:01:02:03:04:05'`],
  aclitem: [`'postgres=arwdDxt/postgres'`],
  bpchar: [`'a'`],
  varchar: [`'x, "y" {z}'`],
  date: [`'4713-01-01 BC'`, `'5874897-12-31'`, `'infinity'`],
  time: [`'24:00:00'`, `'00:00:00.000001'`],
  timestamp: [`'294276-12-31 23:59:59.999999'`, `'4713-01-01 00:00:00 BC'`, `'-infinity'`],
  timestamptz: [`'2026-11-25 00:50:18.123456+05:30'`, `'infinity'`],
  interval: [`'-178000000 years'`, `'1 day -00:00:00.000001'`],
  timetz: [`'24:00:00-15:59'`, `'00:00:00.000001+14'`],
  bit: [`'1'`],
  varbit: [`'1010'`, `''`],
  numeric: [`'NaN'`, `'-0.000000000000000000001'`, `'123456789012345678901234567890.123456789'`],
  refcursor: [`'cursor name'`],
  regprocedure: [`'abs(integer)'`],
  regoper: [`(SELECT oid FROM pg_operator WHERE oprname = '||/' LIMIT 1)`],
  regoperator: [`'+(integer,integer)'`],
  regclass: [`'pg_class'`],
  regcollation: [`'"C"'`],
  regtype: [`'integer[]'`],
  regrole: [`'postgres'`],
  regnamespace: [`'pg_catalog'`],
  uuid: [`'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'`],
  pg_lsn: [`'FFFFFFFF/FFFFFFFF'`, `'0/0'`],
  tsvector: [`$$a:1A fat:2B,4C cat:5 'it''s'$$`],
  gtsvector: [],
  tsquery: [`$$'fat' & ( 'rat':AB | !'cat' )$$`],
  regconfig: [`'english'`],
  regdictionary: [`'simple'`],
  jsonb: [`'{"n": 1.50, "big": 123456789012345678901234567890}'`, `'"string"'`],
  jsonpath: [`'$.a[*] ? (@ > 1)'`],
  txid_snapshot: [`'10:20:10,14,15'`],
  pg_snapshot: [`'10:20:10,14,15'`],
  pg_brin_bloom_summary: [],
  pg_brin_minmax_multi_summary: [],
  int4range: [`'[1,10)'`, `'empty'`],
  numrange: [`'(,5.5]'`],
  tsrange: [`'[2020-01-01,infinity)'`],
  tstzrange: [`'[2020-01-01 00:00+00,2021-01-01 00:00+00)'`],
  daterange: [`'[2020-01-01,2020-01-05)'`],
  int8range: [`'[-9223372036854775808,9223372036854775807)'`],
  int4multirange: [`'{[1,3), [5,7)}'`, `'{}'`],
  nummultirange: [`'{(,1.5]}'`],
  tsmultirange: [`'{[2020-01-01,2020-02-01)}'`],
  tstzmultirange: [`'{[2020-01-01 00:00+00,2020-02-01 00:00+00)}'`],
  datemultirange: [`'{[2020-01-01,2020-01-05), [2020-02-01,2020-02-03)}'`],
  int8multirange: [`'{[1,2)}'`],
  // Ours.
  dnum: [`'12.50'`],
  mood: [`'so-so, "meh"'`, `'ok'`],
  pair: [`ROW(1, 'a "b" (c)', ARRAY[1.5, NULL]::numeric[])`, `ROW(NULL, NULL, NULL)`],
  floatrange: [`'[1.5,2.5)'`],
  floatmultirange: [`'{[1.5,2.5), [3,4]}'`],
};

const OUR_TYPES = `
  CREATE DOMAIN dnum AS numeric(10,2) CHECK (VALUE > 0);
  CREATE TYPE mood AS ENUM ('ok', 'so-so, "meh"');
  CREATE TYPE pair AS (x int, y text, z numeric[]);
  CREATE TYPE floatrange AS RANGE (subtype = float8);
  -- Values of the extended-statistics types exist only where ANALYZE writes them.
  CREATE TABLE stats_src (a int, b int DEFAULT 7);
  INSERT INTO stats_src SELECT i % 10, i % 5 FROM generate_series(1, 1000) i;
  CREATE STATISTICS stats_ab (ndistinct, dependencies, mcv) ON a, b FROM stats_src;
  ANALYZE stats_src;
`;

interface Column {
  name: string;
  sqlType: string;
  typname: string;
  /** The type has no input function that accepts a value: compared as text, not replayed. */
  noInput: boolean;
  values: readonly string[];
}

const ROWS = 4;

describe('every type a table can have', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | null = null;
  let client: pg.Client;
  let columns: Column[] = [];

  beforeAll(async () => {
    f = await startFixture();
    client = await connect(f.source, 'app');
    await client.query(OUR_TYPES);
    const types = await client.query<{
      typname: string;
      sql: string;
      typarray: number;
      array_sql: string | null;
    }>(
      `SELECT t.typname, format('%I.%I', n.nspname, t.typname) AS sql, t.typarray::int AS typarray,
              CASE WHEN t.typarray <> 0 THEN format('%I.%I[]', n.nspname, t.typname) END AS array_sql
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE ((n.nspname = 'pg_catalog' AND t.typtype IN ('b', 'r', 'm')
                AND NOT (t.typcategory = 'A' AND t.typname LIKE '\\_%'))
               OR (n.nspname = 'public' AND t.typtype IN ('d', 'e', 'c', 'r', 'm')
                   AND t.typrelid = 0 OR t.typname = 'pair'))
          AND t.typisdefined AND t.typname NOT IN ('unknown')
        ORDER BY t.oid`,
    );
    const missing = types.rows.map((t) => t.typname).filter((name) => !(name in VALUES));
    expect(missing, 'types of this server without values in the test').toEqual([]);
    const noInput = new Set([
      'pg_ddl_command',
      'pg_node_tree',
      'pg_ndistinct',
      'pg_dependencies',
      'pg_mcv_list',
      'gtsvector',
      'pg_brin_bloom_summary',
      'pg_brin_minmax_multi_summary',
    ]);
    columns = types.rows.flatMap((t, k) => {
      const values = VALUES[t.typname]!;
      const base: Column = {
        name: `c${k}_${t.typname}`,
        sqlType: t.sql,
        typname: t.typname,
        noInput: noInput.has(t.typname),
        values,
      };
      if (t.array_sql === null) return [base];
      // An array of each: two values and a NULL element (one dimension).
      const element = values.map((v) => `(${v})::${t.sql}`);
      const arrayValues =
        element.length === 0
          ? [`ARRAY[NULL]::${t.array_sql}`]
          : [`ARRAY[${element[0]}, NULL, ${element[element.length - 1]}]::${t.array_sql}`, `'{}'`];
      return [
        base,
        {
          name: `a${k}_${t.typname}`,
          sqlType: t.array_sql,
          typname: `_${t.typname}`,
          noInput: base.noInput,
          values: arrayValues,
        },
      ];
    });
    await client.query(
      `CREATE TABLE every_type (id int PRIMARY KEY, ${columns.map((c) => `${c.name} ${c.sqlType}`).join(', ')})`,
    );
  });

  afterAll(async () => {
    if (philotes) {
      philotes.signal('SIGTERM');
      await philotes.exited;
    }
    await client?.end();
    await f?.destroy();
  });

  async function insertRow(id: number): Promise<void> {
    const exprs = columns.map((c) =>
      c.values.length === 0 || id > ROWS
        ? 'NULL'
        : `(${c.values[(id - 1) % c.values.length]!})::${c.sqlType}`,
    );
    await client.query(
      `INSERT INTO every_type (id, ${columns.map((c) => c.name).join(', ')}) VALUES (${id}, ${exprs.join(', ')})`,
    );
  }

  it('copied by the snapshot and streamed, every value replays to the source value', async () => {
    // Rows 1-2 exist before Philotes starts (the initial snapshot copies them), 3-5 are streamed
    // (row 5: every column NULL).
    await insertRow(1);
    await insertRow(2);
    // stats_src has no key (ANALYZE only needs rows): published as it is.
    philotes = startPhilotes(
      f.env({ PHILOTES_CDC_SNAPSHOT: 'initial', PHILOTES_CDC_KEYLESS_TABLES: 'accept' }),
    );
    await waitFor(
      async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'every_type' AND operation = 'SNAPSHOT'`,
            [],
            'buffer',
          )
        )[0]?.n === 2,
      { what: 'the snapshot of rows 1 and 2', timeoutMs: 60_000 },
    );
    for (let id = 3; id <= ROWS + 1; id++) await insertRow(id);
    await client.query(`UPDATE every_type SET id = id + 100 WHERE id = 4`);
    const events = await waitFor(
      async () => {
        // The replayable part as jsonb text: parsed into JavaScript, big numbers would round.
        const rows = await f.buffer.query<{
          operation: string;
          after: Record<string, unknown>;
          replayable: string;
        }>(
          // An UPDATE leaves out unchanged TOASTed values (unchanged_columns): the replay
          // keeps the row's earlier ones, as the replay in docs/events.md does.
          `SELECT operation, merged AS after, (merged - $1::text[])::text AS replayable
             FROM (SELECT e.lsn, e.seq, e.operation,
                          CASE WHEN e.operation = 'UPDATE' THEN p.after || e.after ELSE e.after END AS merged
                     FROM cdc_events e
                     LEFT JOIN LATERAL (
                       SELECT after FROM cdc_events p
                        WHERE p.table_name = 'every_type' AND p.after->>'id' = e.before->>'id'
                          AND (p.lsn, p.seq) < (e.lsn, e.seq)
                        ORDER BY p.lsn DESC, p.seq DESC LIMIT 1) p ON true
                    WHERE e.table_name = 'every_type') x
            ORDER BY lsn, seq`,
          [columns.filter((c) => c.noInput).map((c) => c.name)],
          'buffer',
        );
        return rows.length === 6 ? rows : false;
      },
      { what: 'six events of every_type (two copied, four streamed)', timeoutMs: 60_000 },
    );
    expect(events.map((e) => e.operation)).toEqual([
      'SNAPSHOT',
      'SNAPSHOT',
      'INSERT',
      'INSERT',
      'INSERT',
      'UPDATE',
    ]);
    // json travels as jsonb (docs/events.md: whitespace and key order normalized): compared so.
    const text = (c: Column, at: string) =>
      c.typname === 'json'
        ? `${at}::jsonb::text`
        : c.typname === '_json'
          ? `${at}::jsonb[]::text`
          : `${at}::text`;
    // Each row's latest image (row 4 became 104): the replay of the buffer.
    for (const event of events.filter((e) => e.after['id'] !== 4)) {
      const id = event.after['id'] as number;
      const source = (
        await client.query<Record<string, string | null>>(
          `SELECT ${columns.map((c) => `${text(c, c.name)} AS ${c.name}`).join(', ')} FROM every_type WHERE id = $1`,
          [id],
        )
      ).rows[0]!;
      const replayed = (
        await client.query<Record<string, string | null>>(
          `SELECT ${columns.map((c) => `${text(c, `r.${c.name}`)} AS ${c.name}`).join(', ')}
             FROM jsonb_populate_record(NULL::every_type, $1::jsonb) r`,
          [event.replayable],
        )
      ).rows[0]!;
      for (const c of columns) {
        const got = c.noInput
          ? (event.after[c.name] as string | null) === null
            ? null
            : typeof event.after[c.name] === 'string'
              ? event.after[c.name]
              : JSON.stringify(event.after[c.name])
          : replayed[c.name];
        if (c.noInput && Array.isArray(event.after[c.name])) continue; // [null]: nothing to compare
        expect(got, `row ${id}, ${c.name} (${c.sqlType})`).toBe(source[c.name]);
      }
    }
    // The schema history says which columns are a type's text form (no rule of Philotes' own).
    const [history] = await f.buffer.query<{ columns: Array<Record<string, unknown>> }>(
      `SELECT columns FROM cdc_schema_history WHERE table_name = 'every_type' ORDER BY version DESC LIMIT 1`,
      [],
      'buffer',
    );
    const encoding = new Map(history!.columns.map((c) => [c['name'], c['encoding']]));
    const named = (typname: string) => columns.find((c) => c.typname === typname)!.name;
    expect(encoding.get(named('pair'))).toBe('text');
    expect(encoding.get(named('floatrange'))).toBe('text');
    expect(encoding.get(named('int4'))).toBeUndefined();
    expect(encoding.get(named('int2vector'))).toBeUndefined();
    expect(encoding.get(named('mood'))).toBeUndefined();
  });
});
