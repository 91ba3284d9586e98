/**
 * The type matrix: every PostgreSQL type the "Events" table (docs/events.md) names, with its edge values,
 * captured for real and checked two ways:
 *  (a) the JSON form of each value follows the docs' table (docs/events.md), value for value;
 *  (b) every before/after parses back with jsonb_populate_record, in a scratch database on the
 *      source cluster with the same DDL, into exactly the source row.
 * Plus unchanged TOASTed values (never null: omitted and named, or filled in from the old row under
 * REPLICA IDENTITY FULL), and the known limitations (LIMITATION below).
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Cluster } from '../support/cluster.js';
import {
  connect,
  startFixture,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';

const TYPES_DDL = `
  CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'so-so, "meh"');
  CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
  CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
  CREATE TYPE pair AS (a int, b text);
`;

/**
 * How docs/events.md says a column's non-null values appear in JSON. 'float' is a number, or a string
 * for NaN and ±Infinity; 'text' is a string holding PostgreSQL's own text form.
 */
type Kind = 'number' | 'string' | 'float' | 'boolean' | 'json' | 'text' | 'array';

/** The jsonb_typeof a non-null value of each kind may have. */
const JSON_TYPES: Record<Kind, readonly string[]> = {
  number: ['number'],
  string: ['string'],
  text: ['string'],
  float: ['number', 'string'],
  boolean: ['boolean'],
  json: ['object', 'array', 'string', 'number', 'boolean'],
  array: ['array'],
};

const COLUMNS: ReadonlyArray<{ name: string; type: string; kind: Kind }> = [
  { name: 'id', type: 'int4 PRIMARY KEY', kind: 'number' },
  { name: 'c_int2', type: 'int2', kind: 'number' },
  { name: 'c_int4', type: 'int4', kind: 'number' },
  { name: 'c_int8', type: 'int8', kind: 'string' },
  { name: 'c_num', type: 'numeric', kind: 'string' },
  { name: 'c_num_scaled', type: 'numeric(12,3)', kind: 'string' },
  { name: 'c_f4', type: 'float4', kind: 'float' },
  { name: 'c_f8', type: 'float8', kind: 'float' },
  { name: 'c_bool', type: 'bool', kind: 'boolean' },
  { name: 'c_text', type: 'text', kind: 'text' },
  { name: 'c_varchar', type: 'varchar(20)', kind: 'text' },
  { name: 'c_char', type: 'char(5)', kind: 'text' },
  { name: 'c_qchar', type: '"char"', kind: 'text' },
  { name: 'c_name', type: 'name', kind: 'text' },
  { name: 'c_uuid', type: 'uuid', kind: 'text' },
  { name: 'c_json', type: 'json', kind: 'json' },
  { name: 'c_jsonb', type: 'jsonb', kind: 'json' },
  { name: 'c_date', type: 'date', kind: 'text' },
  { name: 'c_time', type: 'time', kind: 'text' },
  { name: 'c_timetz', type: 'timetz', kind: 'text' },
  { name: 'c_ts', type: 'timestamp', kind: 'string' },
  { name: 'c_tstz', type: 'timestamptz', kind: 'string' },
  { name: 'c_interval', type: 'interval', kind: 'text' },
  { name: 'c_bytea', type: 'bytea', kind: 'string' },
  { name: 'c_inet', type: 'inet', kind: 'text' },
  { name: 'c_cidr', type: 'cidr', kind: 'text' },
  { name: 'c_macaddr', type: 'macaddr', kind: 'text' },
  { name: 'c_money', type: 'money', kind: 'string' },
  { name: 'c_bit', type: 'bit(8)', kind: 'text' },
  { name: 'c_varbit', type: 'varbit', kind: 'text' },
  { name: 'c_tsv', type: 'tsvector', kind: 'text' },
  { name: 'c_xml', type: 'xml', kind: 'text' },
  { name: 'c_point', type: 'point', kind: 'text' },
  { name: 'c_box', type: 'box', kind: 'text' },
  { name: 'c_circle', type: 'circle', kind: 'text' },
  { name: 'c_i4range', type: 'int4range', kind: 'text' },
  { name: 'c_tstzrange', type: 'tstzrange', kind: 'text' },
  { name: 'c_enum', type: 'mood', kind: 'text' },
  { name: 'c_dint', type: 'posint', kind: 'number' },
  { name: 'c_dtext', type: 'email', kind: 'text' },
  { name: 'c_comp', type: 'pair', kind: 'text' },
  { name: 'c_i4a', type: 'int4[]', kind: 'array' },
  { name: 'c_ta', type: 'text[]', kind: 'array' },
  { name: 'c_i2d', type: 'int[][]', kind: 'array' },
  { name: 'c_numa', type: 'numeric[]', kind: 'array' },
  { name: 'c_enuma', type: 'mood[]', kind: 'array' },
  { name: 'c_jsonba', type: 'jsonb[]', kind: 'array' },
  { name: 'c_tstza', type: 'timestamptz[]', kind: 'array' },
  { name: 'c_byteaa', type: 'bytea[]', kind: 'array' },
  { name: 'c_boxa', type: 'box[]', kind: 'array' },
  { name: 'c_empty', type: 'int4[]', kind: 'array' },
  { name: 'c_oid', type: 'oid', kind: 'number' },
  { name: 'c_f8a', type: 'float8[]', kind: 'array' },
  { name: 'c_dinta', type: 'posint[]', kind: 'array' },
  { name: 'c_compa', type: 'pair[]', kind: 'array' },
];

const MATRIX_DDL = `CREATE TABLE matrix (${COLUMNS.map((c) => `${c.name} ${c.type}`).join(', ')});
  ALTER TABLE matrix REPLICA IDENTITY FULL;`;

/** A column's SQL literal and the JSON docs/events.md says its event value must be. */
type Cell = readonly [sql: string, json: string];

const BIG = '123456789012345678901234567890';
const NASTY_TEXT = `tab\there\nnewline\r\ncrlf back\\slash "double" 'single' é ß 中文 🎉 {brace},comma NULL`;
const sqlString = (s: string): string => `'${s.replace(/'/g, "''")}'`;

/** Rows by id; a column not named is NULL. Row 2 is NULL in every column but the key. */
const ROWS: Record<number, Record<string, Cell>> = {
  1: {
    c_int2: ['32767', '32767'],
    c_int4: ['-2147483648', '-2147483648'],
    c_int8: ['9223372036854775807', '"9223372036854775807"'],
    c_num: [`'${BIG}.000000000000000000000000000001'`, `"${BIG}.000000000000000000000000000001"`],
    c_num_scaled: ['1.5', '"1.500"'],
    c_f4: ['1.1', '1.1'],
    c_f8: ['1e308', '1e308'],
    c_bool: ['true', 'true'],
    c_text: [sqlString(NASTY_TEXT), JSON.stringify(NASTY_TEXT)],
    c_varchar: [`'varchar ✓'`, '"varchar ✓"'],
    c_char: [`'ab'`, '"ab   "'],
    c_qchar: [`'x'`, '"x"'],
    c_name: [`'a name'`, '"a name"'],
    c_uuid: [`'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'`, '"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'],
    // The event carries the JSON value, big number digits and all (see the json test below).
    c_json: [
      `'{ "big" : ${BIG}, "dup": 1, "dup": 2,\n  "arr": [1, 2.50, "x"] }'`,
      `{"big": ${BIG}, "dup": 2, "arr": [1, 2.50, "x"]}`,
    ],
    c_jsonb: [
      `'{"big": ${BIG}, "nested": {"a": [1, null, "s\\u00e9"]}, "f": 1.50}'`,
      `{"big": ${BIG}, "nested": {"a": [1, null, "sé"]}, "f": 1.50}`,
    ],
    c_date: [`'2024-02-29'`, '"2024-02-29"'],
    c_time: [`'23:59:59.999999'`, '"23:59:59.999999"'],
    c_timetz: [`'03:04:05.123456+05:30'`, '"03:04:05.123456+05:30"'],
    c_ts: [`'2026-01-02 03:04:05.123456'`, '"2026-01-02T03:04:05.123456"'],
    c_tstz: [`'2026-01-02 03:04:05.123456+00'`, '"2026-01-02T03:04:05.123456Z"'],
    c_interval: [`'1 year 2 mons 3 days 04:05:06.789'`, '"P1Y2M3DT4H5M6.789S"'],
    c_bytea: [`'\\x00ff10'`, '"\\\\x00ff10"'],
    c_inet: [`'192.168.0.1/24'`, '"192.168.0.1/24"'],
    c_cidr: [`'10.0.0.0/8'`, '"10.0.0.0/8"'],
    c_macaddr: [`'08:00:2b:01:02:03'`, '"08:00:2b:01:02:03"'],
    c_money: [`'1234.56'`, '"1234.56"'],
    c_bit: [`B'10101010'`, '"10101010"'],
    c_varbit: [`B'101'`, '"101"'],
    c_tsv: [`'a fat cat:3 sat'`, `"'a' 'cat':3 'fat' 'sat'"`],
    c_xml: [`'<a b="1">x &amp; y</a>'`, '"<a b=\\"1\\">x &amp; y</a>"'],
    c_point: [`'(1.5,-2)'`, '"(1.5,-2)"'],
    c_box: [`'(0,0),(1,1)'`, '"(1,1),(0,0)"'],
    c_circle: [`'<(1,2),3>'`, '"<(1,2),3>"'],
    c_i4range: [`'[1,10)'`, '"[1,10)"'],
    c_tstzrange: [
      `'[2026-01-01 00:00:00+00,2026-02-01 00:00:00+00)'`,
      '"[\\"2026-01-01 00:00:00+00\\",\\"2026-02-01 00:00:00+00\\")"',
    ],
    c_enum: [`'so-so, "meh"'`, '"so-so, \\"meh\\""'],
    c_dint: ['7', '7'],
    c_dtext: [`'a@b.example'`, '"a@b.example"'],
    c_comp: [`'(1,"x, y")'`, '"(1,\\"x, y\\")"'],
    c_i4a: [`'{1,2,NULL,-3}'`, '[1, 2, null, -3]'],
    c_ta: [
      `ARRAY[NULL, 'NULL', 'q"uote', 'com,ma', '{br}ace', 'back\\slash', '', ' sp ', 'null', E'tab\\tnl\\n']`,
      '[null, "NULL", "q\\"uote", "com,ma", "{br}ace", "back\\\\slash", "", " sp ", "null", "tab\\tnl\\n"]',
    ],
    c_i2d: [`'{{1,2},{3,4}}'`, '[[1, 2], [3, 4]]'],
    c_numa: [`'{1.10,NaN,-0.000001}'`, '["1.10", "NaN", "-0.000001"]'],
    c_enuma: [`'{happy,"so-so, \\"meh\\"",NULL}'`, '["happy", "so-so, \\"meh\\"", null]'],
    c_jsonba: [
      `ARRAY['{"a": 1}'::jsonb, '[1, "x"]', '"str"', '${BIG}', NULL]`,
      `[{"a": 1}, [1, "x"], "str", ${BIG}, null]`,
    ],
    c_tstza: [
      `'{"2026-01-02 03:04:05.123456+00","1999-12-31 23:59:59.5+00",infinity}'`,
      '["2026-01-02T03:04:05.123456Z", "1999-12-31T23:59:59.500000Z", "infinity"]',
    ],
    c_byteaa: [
      `ARRAY['\\x00'::bytea, '', '\\xdeadbeef', NULL]`,
      '["\\\\x00", "\\\\x", "\\\\xdeadbeef", null]',
    ],
    c_boxa: [`ARRAY[box '(1,1),(0,0)', box '(3,3),(2,2)']`, '["(1,1),(0,0)", "(3,3),(2,2)"]'],
    c_empty: [`'{}'`, '[]'],
    c_oid: ['4294967295', '4294967295'],
    c_f8a: [`'{NaN,-Infinity,1.5,1e-300}'`, '["NaN", "-Infinity", 1.5, 1e-300]'],
    c_dinta: [`'{1,NULL,3}'`, '[1, null, 3]'],
    c_compa: [`ARRAY['(1,"x, y")'::pair, NULL, '(,)']`, '["(1,\\"x, y\\")", null, "(,)"]'],
  },
  2: {},
  3: {
    c_int2: ['-32768', '-32768'],
    c_int8: ['-9223372036854775808', '"-9223372036854775808"'],
    c_num: [`'NaN'`, '"NaN"'],
    c_f4: [`'NaN'`, '"NaN"'],
    c_f8: ['5e-324', '5e-324'],
    c_bool: ['false', 'false'],
    c_text: [`''`, '""'],
    c_json: [`'[]'`, '[]'],
    c_jsonb: [`'"just a string"'`, '"just a string"'],
    c_date: [`'infinity'`, '"infinity"'],
    c_ts: [`'infinity'`, '"infinity"'],
    c_tstz: [`'-infinity'`, '"-infinity"'],
    c_interval: [`'-1 days +02:03:00.000001'`, '"P-1DT2H3M0.000001S"'],
    c_bytea: [`''`, '"\\\\x"'],
    c_inet: [`'::1'`, '"::1"'],
    c_money: [`'-1.5'`, '"-1.50"'],
    c_i4range: [`'empty'`, '"empty"'],
    c_enum: [`'sad'`, '"sad"'],
    c_comp: [`ROW(NULL, NULL)`, '"(,)"'],
  },
  4: {
    c_num: [`'-0.000001'`, '"-0.000001"'],
    c_f4: [`'-Infinity'`, '"-Infinity"'],
    c_f8: [`'Infinity'`, '"Infinity"'],
    c_date: [`'0044-03-15 BC'`, '"0044-03-15 BC"'],
    // BC timestamps have no ISO-8601 form PostgreSQL reads back: they keep PostgreSQL's own.
    c_ts: [`'0044-03-15 12:00:00 BC'`, '"0044-03-15 12:00:00 BC"'],
    c_tstz: [`'0044-03-15 12:00:00.5+00 BC'`, '"0044-03-15 12:00:00.5+00 BC"'],
    c_bytea: [`'\\x00'`, '"\\\\x00"'],
  },
  5: {
    c_num: [`'0.000001'`, '"0.000001"'],
    c_f8: [`'NaN'`, '"NaN"'],
    c_f4: [`'3.4028235e38'`, '3.4028235e38'],
    c_date: [`'-infinity'`, '"-infinity"'],
    c_ts: [`'10000-01-01 00:00:00'`, '"10000-01-01T00:00:00.000000"'],
    // Another zone in, UTC out, and a value without a fraction still gets six digits.
    c_tstz: [`'2026-01-02 03:04:05+05:30'`, '"2026-01-01T21:34:05.000000Z"'],
    c_i4a: [`'{}'`, '[]'],
  },
};

/** The UPDATE of row 1 and the row it leaves. */
const UPDATE_SQL = `UPDATE matrix SET c_int4 = 42, c_text = E'changed\\ttext', c_ta = ARRAY['x', NULL],
  c_tstz = '2030-06-07 08:09:10.000001+00', c_f8 = '-Infinity' WHERE id = 1`;
const UPDATED: Record<string, string> = {
  c_int4: '42',
  c_text: '"changed\\ttext"',
  c_ta: '["x", null]',
  c_tstz: '"2030-06-07T08:09:10.000001Z"',
  c_f8: '"-Infinity"',
};
const DELETED_ID = 3;

/**
 * The row as text with json normalized to jsonb: what a replay must reproduce exactly.
 *
 * LIMITATION (json): cdc_events.after is jsonb, so a json value's whitespace, key order and
 * duplicate keys cannot survive the buffer (docs/events.md promises "the JSON value itself"); and no
 * encoding could fix that for this replay: jsonb_populate_record fills a json column from a JSON
 * string with the quoted string, not its contents. json is therefore compared as jsonb here, and
 * the json test below pins down exactly what survives.
 */
const CANON = (table: string, cols: ReadonlyArray<{ name: string; type: string }>): string =>
  `ROW(${cols.map((c) => (c.type === 'json' ? `${table}.${c.name}::jsonb` : `${table}.${c.name}`)).join(', ')})::text`;

const QUIRKS_COLUMNS = [
  { name: 'id', type: 'int4 PRIMARY KEY' },
  { name: 'f4', type: 'float4' },
  { name: 'f8', type: 'float8' },
  { name: 'bounded', type: 'int4[]' },
  { name: 'bounded2d', type: 'int4[]' },
  { name: 'jb', type: 'jsonb' },
  { name: 'jba', type: 'jsonb[]' },
] as const;
const QUIRKS_DDL = `CREATE TABLE quirks (${QUIRKS_COLUMNS.map((c) => `${c.name} ${c.type}`).join(', ')})`;

const TOAST_DDL = `
  CREATE TABLE toast_default (id int PRIMARY KEY, note text, big text);
  CREATE TABLE toast_full (id int PRIMARY KEY, note text, big text);
  ALTER TABLE toast_full REPLICA IDENTITY FULL;`;
/** ~32 kB of random hex: far over the 2 kB TOAST threshold and not compressible below it. */
const RANDOM_BIG = `(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 1000) i)`;

interface TextEvent {
  lsn: string;
  seq: number;
  operation: string;
  table_name: string;
  /** jsonb as its text, so no number goes through a JavaScript double. */
  before: string | null;
  after: string | null;
  unchanged_columns: string[] | null;
  key: number;
}

async function readTextEvents(buffer: Cluster, table: string): Promise<TextEvent[]> {
  return buffer.query<TextEvent>(
    `SELECT lsn::text, seq, operation, table_name, before::text AS before, after::text AS after,
            unchanged_columns, coalesce(after, before)->'id' AS key
       FROM cdc_events WHERE source_id = 'app' AND table_name = $1 ORDER BY lsn, seq`,
    [table],
    'buffer',
  );
}

/** Each top-level key of a JSON object as jsonb-normalized text and jsonb_typeof. */
async function jsonFields(
  buffer: Cluster,
  jsonText: string,
): Promise<Map<string, { text: string; type: string }>> {
  const rows = await buffer.query<{ key: string; text: string; type: string }>(
    'SELECT key, value::text AS text, jsonb_typeof(value) AS type FROM jsonb_each($1::jsonb)',
    [jsonText],
    'buffer',
  );
  return new Map(rows.map((r) => [r.key, { text: r.text, type: r.type }]));
}

function insertSql(id: number, cells: Record<string, Cell>): string {
  const names = ['id', ...Object.keys(cells)];
  const values = [String(id), ...Object.values(cells).map(([sql]) => sql)];
  return `INSERT INTO matrix (${names.join(', ')}) VALUES (${values.join(', ')})`;
}

/** The JSON text of an event's row as docs/events.md says it must be (every column present). */
function expectedJson(id: number, overrides: Record<string, string> = {}): string {
  const cells = ROWS[id]!;
  const fields = COLUMNS.map((c) => {
    const json = c.name === 'id' ? String(id) : (overrides[c.name] ?? cells[c.name]?.[1] ?? 'null');
    return `${JSON.stringify(c.name)}: ${json}`;
  });
  return `{${fields.join(', ')}}`;
}

const ISO_TIMESTAMPTZ = /^\d{4,}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/;

describe('type matrix', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;
  /** A database on the source cluster with the same DDL, for replays. */
  let scratch: pg.Client;
  /** The canonical text of matrix rows by id, taken right after each step. */
  const afterInsert = new Map<number, string>();
  const afterUpdate = new Map<number, string>();
  let events: TextEvent[];

  const matrixCanon = CANON('t', COLUMNS);
  const sourceRows = async (): Promise<Map<number, string>> => {
    const rows = await f.source.query<{ id: number; row: string }>(
      `SELECT id, ${matrixCanon} AS row FROM matrix t ORDER BY id`,
      [],
      'app',
    );
    return new Map(rows.map((r) => [r.id, r.row]));
  };
  /** The canonical text of the row jsonb_populate_record makes of `json`. */
  const populate = async (table: string, canon: string, json: string): Promise<string> => {
    const { rows } = await scratch.query<{ row: string }>(
      `SELECT ${canon} AS row FROM jsonb_populate_record(NULL::${table}, $1::jsonb) t`,
      [json],
    );
    return rows[0]!.row;
  };

  beforeAll(async () => {
    f = await startFixture();
    const ddl = [TYPES_DDL, MATRIX_DDL, QUIRKS_DDL, TOAST_DDL].join(';\n');
    await f.source.query(ddl, [], 'app');
    await f.source.createDatabase('scratch');
    await f.source.query(ddl, [], 'scratch');
    scratch = await connect(f.source, 'scratch');
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);

    for (const [id, cells] of Object.entries(ROWS)) {
      await f.source.query(insertSql(Number(id), cells), [], 'app');
    }
    for (const [id, row] of await sourceRows()) afterInsert.set(id, row);
    await f.source.query(UPDATE_SQL, [], 'app');
    for (const [id, row] of await sourceRows()) afterUpdate.set(id, row);
    await f.source.query('DELETE FROM matrix WHERE id = $1', [DELETED_ID], 'app');

    await f.source.query(
      `INSERT INTO quirks VALUES (1, '-0', '-0', '[0:1]={1,2}', '[0:1][-1:0]={{1,2},{3,4}}', 'null', ARRAY['null'::jsonb, '1'])`,
      [],
      'app',
    );
    for (const table of ['toast_default', 'toast_full']) {
      await f.source.query(`INSERT INTO ${table} VALUES (1, 'first', ${RANDOM_BIG})`, [], 'app');
      await f.source.query(`UPDATE ${table} SET note = 'second' WHERE id = 1`, [], 'app');
      await f.source.query(`INSERT INTO ${table} VALUES (2, 'other', ${RANDOM_BIG})`, [], 'app');
      await f.source.query(`DELETE FROM ${table} WHERE id = 2`, [], 'app');
    }
    await waitForCatchUp(f, 60_000);
    events = await readTextEvents(f.buffer, 'matrix');
  });

  afterAll(async () => {
    await scratch?.end();
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await f?.destroy();
  });

  it('captures the inserts, the update and the delete in order', () => {
    expect(events.map((e) => [e.operation, e.key])).toEqual([
      ...Object.keys(ROWS).map((id) => ['INSERT', Number(id)]),
      ['UPDATE', 1],
      ['DELETE', DELETED_ID],
    ]);
  });

  it('encodes every value as the events table (docs/events.md) says (JSON type and exact value)', async () => {
    const inserts = events.filter((e) => e.operation === 'INSERT');
    for (const e of inserts) {
      const got = await jsonFields(f.buffer, e.after!);
      const want = await jsonFields(f.buffer, expectedJson(e.key));
      // Every column is present (none left out, none reported as something else)...
      expect([...got.keys()].sort(), `row ${e.key} keys`).toEqual(
        COLUMNS.map((c) => c.name).sort(),
      );
      for (const c of COLUMNS) {
        const g = got.get(c.name)!;
        // ...with the exact value (jsonb-normalized on both sides, so 1e308 = 1e+308)...
        expect(g.text, `row ${e.key} ${c.name} (${c.type})`).toBe(want.get(c.name)!.text);
        if (g.type === 'null') continue;
        // ...and of the JSON type docs/events.md names for the column's type.
        expect(JSON_TYPES[c.kind], `row ${e.key} ${c.name} is a JSON ${g.type}`).toContain(g.type);
        if (c.kind === 'float' && g.type === 'string') {
          expect(JSON.parse(g.text)).toMatch(/^(NaN|Infinity|-Infinity)$/);
        }
      }
    }
    // Row 2: NULL in every column is JSON null, present under its name.
    const nulls = await jsonFields(f.buffer, inserts.find((e) => e.key === 2)!.after!);
    for (const c of COLUMNS.slice(1))
      expect(nulls.get(c.name), c.name).toEqual({ text: 'null', type: 'null' });
  });

  it('writes every finite AD timestamptz as ISO-8601 UTC with exactly six fractional digits', async () => {
    const values = await f.buffer.query<{ v: string }>(
      `SELECT v FROM cdc_events e,
              LATERAL (SELECT e.after->>'c_tstz' UNION ALL
                       SELECT jsonb_array_elements_text(
                         CASE jsonb_typeof(e.after->'c_tstza') WHEN 'array' THEN e.after->'c_tstza' ELSE '[]' END)) x(v)
        WHERE e.table_name = 'matrix' AND e.after IS NOT NULL AND v IS NOT NULL`,
      [],
      'buffer',
    );
    const finite = values.map((r) => r.v).filter((v) => !/infinity| BC$/.test(v));
    expect(finite.length).toBeGreaterThanOrEqual(7);
    for (const v of finite) expect(v).toMatch(ISO_TIMESTAMPTZ);
  });

  it('the UPDATE carries the complete old row (REPLICA IDENTITY FULL) and the new one', async () => {
    const update = events.find((e) => e.operation === 'UPDATE')!;
    expect(update.unchanged_columns).toBeNull();
    const before = await jsonFields(f.buffer, update.before!);
    const wantBefore = await jsonFields(f.buffer, expectedJson(1));
    const after = await jsonFields(f.buffer, update.after!);
    const wantAfter = await jsonFields(f.buffer, expectedJson(1, UPDATED));
    for (const c of COLUMNS) {
      expect(before.get(c.name)?.text, `before.${c.name}`).toBe(wantBefore.get(c.name)!.text);
      expect(after.get(c.name)?.text, `after.${c.name}`).toBe(wantAfter.get(c.name)!.text);
    }
  });

  it('every before and after parses back with jsonb_populate_record into exactly the source row', async () => {
    const lastRow = new Map<number, string>();
    for (const e of events) {
      const where = `${e.operation} at ${e.lsn}/${e.seq}`;
      if (e.operation === 'INSERT') {
        const id = e.key;
        expect(await populate('matrix', matrixCanon, e.after!), `${where} after`).toBe(
          afterInsert.get(id),
        );
        lastRow.set(id, e.after!);
      } else if (e.operation === 'UPDATE') {
        expect(await populate('matrix', matrixCanon, e.before!), `${where} before`).toBe(
          afterInsert.get(1),
        );
        expect(await populate('matrix', matrixCanon, e.after!), `${where} after`).toBe(
          afterUpdate.get(1),
        );
        lastRow.set(1, e.after!);
      } else {
        expect(await populate('matrix', matrixCanon, e.before!), `${where} before`).toBe(
          afterUpdate.get(DELETED_ID),
        );
        lastRow.delete(DELETED_ID);
      }
    }

    // The replay proper: the final rows, inserted, are the source table.
    await scratch.query('TRUNCATE matrix');
    for (const json of lastRow.values()) {
      await scratch.query(
        'INSERT INTO matrix SELECT * FROM jsonb_populate_record(NULL::matrix, $1::jsonb)',
        [json],
      );
    }
    const digest = `SELECT count(*)::int AS n, md5(string_agg(${matrixCanon}, E'\\n' ORDER BY id)) AS md5 FROM matrix t`;
    const [replayed] = (await scratch.query<{ n: number; md5: string }>(digest)).rows;
    const [source] = await f.source.query<{ n: number; md5: string }>(digest, [], 'app');
    expect(replayed).toEqual(source);
    expect(source!.n).toBe(Object.keys(ROWS).length - 1);
  });

  it('json: the JSON value survives (big numbers to the digit), not its text (LIMITATION, see CANON)', async () => {
    const [row] = await f.buffer.query<{ j: string; big: string }>(
      `SELECT (after->'c_json')::text AS j, after->'c_json'->>'big' AS big FROM cdc_events
        WHERE table_name = 'matrix' AND operation = 'INSERT' AND (after->'id')::int = 1`,
      [],
      'buffer',
    );
    const [source] = await f.source.query<{ raw: string; asjsonb: string }>(
      `SELECT c_json::text AS raw, c_json::jsonb::text AS asjsonb FROM matrix WHERE id = 1`,
      [],
      'app',
    );
    expect(row!.big).toBe(BIG);
    expect(row!.j).toBe(source!.asjsonb);
    // The source keeps the text exactly, the replay gets the jsonb normal form: explicit, so a
    // change in either direction is noticed.
    expect(source!.raw).toContain('"dup": 1, "dup": 2,\n');
    const replayed = (
      await scratch.query<{ j: string }>(
        `SELECT c_json::text AS j FROM jsonb_populate_record(NULL::matrix, $1::jsonb)`,
        [`{"c_json": ${row!.j}}`],
      )
    ).rows[0]!.j;
    expect(replayed).toBe(source!.asjsonb);
  });

  describe('values that do not survive the buffer', () => {
    let quirk: { after: string; source: Record<string, string | null> };
    const quirksCanon = CANON('t', QUIRKS_COLUMNS);

    beforeAll(async () => {
      const [e] = await readTextEvents(f.buffer, 'quirks');
      const [source] = await f.source.query<Record<string, string | null>>(
        `SELECT ${QUIRKS_COLUMNS.map((c) => `${c.name}::text`).join(', ')}, ${quirksCanon} AS row FROM quirks t`,
        [],
        'app',
      );
      quirk = { after: e!.after!, source: source! };
      expect(quirk.source['f8']).toBe('-0');
    });

    const replayed = async (column: string): Promise<string | null> =>
      (
        await scratch.query<{ v: string | null }>(
          `SELECT ${column}::text AS v FROM jsonb_populate_record(NULL::quirks, $1::jsonb)`,
          [quirk.after],
        )
      ).rows[0]!.v;

    // float -0 travels as the string "-0" (like NaN): jsonb would turn the number -0 into 0.
    it('float -0 keeps its sign', async () => {
      expect(await replayed('f8')).toBe('-0');
      expect(await replayed('f4')).toBe('-0');
    });

    // A JSON array has no lower bound: an array with explicit bounds travels as PostgreSQL's text,
    // which jsonb_populate_record reads back exactly.
    it('explicit array bounds survive', async () => {
      expect(await replayed('bounded')).toBe('[0:1]={1,2}');
      expect(await replayed('bounded2d')).toBe('[0:1][-1:0]={{1,2},{3,4}}');
      const fields = await jsonFields(f.buffer, quirk.after);
      expect(fields.get('bounded')).toEqual({ text: '"[0:1]={1,2}"', type: 'string' });
    });

    // LIMITATION: a jsonb value that is JSON null ('null'::jsonb, not SQL NULL) is spliced as the
    // JSON value itself, as docs/events.md says, which is exactly how SQL NULL is written: the two
    // cannot be told apart in `after`, and the replay turns it into SQL NULL (inside jsonb[] too).
    // No JSON value fixes that without changing the event format; pinned here so it stays known.
    it('LIMITATION: jsonb null is written as null, the same as SQL NULL', async () => {
      expect(quirk.source['jb']).toBe('null');
      expect(quirk.source['jba']).toBe('{"null",1}');
      const fields = await jsonFields(f.buffer, quirk.after);
      expect(fields.get('jb')).toEqual({ text: 'null', type: 'null' });
      expect(fields.get('jba')!.text).toBe('[null, 1]');
      expect(await replayed('jb')).toBeNull();
      expect(await replayed('jba')).toBe('{NULL,1}');
    });
  });

  describe('unchanged TOASTed values', () => {
    it('default replica identity: left out of `after`, named in unchanged_columns, never null', async () => {
      const es = await readTextEvents(f.buffer, 'toast_default');
      expect(es.map((e) => e.operation)).toEqual(['INSERT', 'UPDATE', 'INSERT', 'DELETE']);
      const update = es[1]!;
      expect(update.unchanged_columns).toEqual(['big']);
      expect(update.before).toBeNull();
      const after = await jsonFields(f.buffer, update.after!);
      expect([...after.keys()].sort()).toEqual(['id', 'note']);
      expect(after.get('note')!.text).toBe('"second"');
      // The delete under the default identity carries the key only.
      expect(JSON.parse(es[3]!.before!)).toEqual({ id: 2 });
      await expectToastReplay('toast_default', es);
    });

    it('REPLICA IDENTITY FULL: the old row fills the value in, in `after` and `before`', async () => {
      const es = await readTextEvents(f.buffer, 'toast_full');
      expect(es.map((e) => e.operation)).toEqual(['INSERT', 'UPDATE', 'INSERT', 'DELETE']);
      const update = es[1]!;
      expect(update.unchanged_columns).toBeNull();
      const [source] = await f.source.query<{ md5: string; len: number }>(
        'SELECT md5(big), length(big) AS len FROM toast_full WHERE id = 1',
        [],
        'app',
      );
      expect(source!.len).toBeGreaterThan(8192);
      const [stored] = await f.buffer.query<{ after: string; before: string }>(
        `SELECT md5(after->>'big') AS after, md5(before->>'big') AS before FROM cdc_events
          WHERE table_name = 'toast_full' AND operation = 'UPDATE'`,
        [],
        'buffer',
      );
      expect(stored).toEqual({ after: source!.md5, before: source!.md5 });
      expect(JSON.parse(update.after!)).toMatchObject({ id: 1, note: 'second' });
      expect(JSON.parse(update.before!)).toMatchObject({ id: 1, note: 'first' });
      await expectToastReplay('toast_full', es);
    });

    /** Replays the events (an unchanged column keeps the value it had) and compares with the source. */
    async function expectToastReplay(table: string, es: TextEvent[]): Promise<void> {
      const rows = new Map<number, Record<string, unknown>>();
      for (const e of es) {
        if (e.operation === 'DELETE') {
          rows.delete(e.key ?? (JSON.parse(e.before!) as { id: number }).id);
          continue;
        }
        const after = JSON.parse(e.after!) as Record<string, unknown>;
        const merged = { ...after };
        for (const col of e.unchanged_columns ?? []) merged[col] = rows.get(e.key)![col];
        rows.set(e.key, merged);
      }
      await scratch.query(`TRUNCATE ${table}`);
      for (const row of rows.values()) {
        await scratch.query(
          `INSERT INTO ${table} SELECT * FROM jsonb_populate_record(NULL::${table}, $1::jsonb)`,
          [JSON.stringify(row)],
        );
      }
      const digest = `SELECT count(*)::int AS n, md5(string_agg(t::text, E'\\n' ORDER BY id)) AS md5 FROM ${table} t`;
      const [replayed] = (await scratch.query<{ n: number; md5: string }>(digest)).rows;
      const [source] = await f.source.query<{ n: number; md5: string }>(digest, [], 'app');
      expect(replayed).toEqual(source);
      expect(source!.n).toBe(1);
    }
  });
});
