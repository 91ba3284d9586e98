import { describe, expect, it } from 'vitest';
import { CopyBuffer } from '../../workers/decode/copy-buffer.js';
import { copyPieces } from '../../src/common/protocol.js';
import { tupleView } from '../support/pgoutput.js';
import {
  BUILTIN_TYPES,
  TEXT_TYPE,
  isoTimestamp,
  moneyDigits,
  moneyType,
  parseArrayLiteral,
  toJson,
  writeJson,
  type TypeInfo,
} from '../../workers/decode/values.js';

/** A built-in type by name ('int4', '_text', ...). */
function type(name: string): TypeInfo {
  for (const t of BUILTIN_TYPES.values()) if (t.name === name) return t;
  throw new Error(`no built-in type ${name}`);
}

/** Whether JSON text holds a \u0000 escape (one not preceded by an escaped backslash). */
function hasNulEscape(jsonText: string): boolean {
  for (const m of jsonText.matchAll(/(\\+)u0000/gi)) if (m[1]!.length % 2 === 1) return true;
  return false;
}

/** toJson for a type name; the result must always be valid JSON. */
function json(text: string, typeName: string): string {
  const out = toJson(text, type(typeName));
  expect(
    () => JSON.parse(out),
    `toJson(${JSON.stringify(text)}, ${typeName}) = ${out}`,
  ).not.toThrow();
  return out;
}

describe('type table', () => {
  it('maps the well-known OIDs', () => {
    expect(BUILTIN_TYPES.get(16)).toMatchObject({ name: 'bool', kind: 'bool' });
    expect(BUILTIN_TYPES.get(20)).toMatchObject({ name: 'int8', kind: 'quoted' });
    expect(BUILTIN_TYPES.get(23)).toMatchObject({ name: 'int4', kind: 'number' });
    expect(BUILTIN_TYPES.get(1700)).toMatchObject({ name: 'numeric', kind: 'quoted' });
    expect(BUILTIN_TYPES.get(3802)).toMatchObject({ name: 'jsonb', kind: 'json' });
    expect(BUILTIN_TYPES.get(1184)).toMatchObject({ name: 'timestamptz', kind: 'timestamptz' });
    expect(TEXT_TYPE).toMatchObject({ oid: 25, name: 'text', kind: 'string' });
  });

  it('knows array types with their element and delimiter', () => {
    expect(BUILTIN_TYPES.get(1007)).toMatchObject({
      name: '_int4',
      kind: 'array',
      delimiter: ',',
      element: { oid: 23 },
    });
    expect(BUILTIN_TYPES.get(1020)).toMatchObject({
      name: '_box',
      kind: 'array',
      delimiter: ';',
      element: { oid: 603 },
    });
  });
});

describe('toJson scalars', () => {
  it('bool', () => {
    expect(json('t', 'bool')).toBe('true');
    expect(json('f', 'bool')).toBe('false');
  });

  it('int2, int4, oid as JSON numbers', () => {
    expect(json('-32768', 'int2')).toBe('-32768');
    expect(json('2147483647', 'int4')).toBe('2147483647');
    expect(json('-2147483648', 'int4')).toBe('-2147483648');
    expect(json('4294967295', 'oid')).toBe('4294967295');
    expect(JSON.parse(json('42', 'int4'))).toBe(42);
  });

  it('int8 and numeric as strings, every digit kept', () => {
    expect(json('9223372036854775807', 'int8')).toBe('"9223372036854775807"');
    expect(json('-9223372036854775808', 'int8')).toBe('"-9223372036854775808"');
    expect(json('12345678901234567890.123456789', 'numeric')).toBe(
      '"12345678901234567890.123456789"',
    );
    expect(json('0.000000000000000000000001', 'numeric')).toBe('"0.000000000000000000000001"');
    expect(json('NaN', 'numeric')).toBe('"NaN"');
    expect(json('Infinity', 'numeric')).toBe('"Infinity"');
  });

  it('float4/float8 as numbers, NaN and ±Infinity as strings', () => {
    expect(json('1.5', 'float8')).toBe('1.5');
    // jsonb would store the number -0 as 0: the sign travels in a string.
    expect(json('-0', 'float8')).toBe('"-0"');
    expect(json('1e+300', 'float8')).toBe('1e+300');
    expect(json('1.2345678901234568e-07', 'float8')).toBe('1.2345678901234568e-07');
    expect(json('3.4028235e+38', 'float4')).toBe('3.4028235e+38');
    expect(json('NaN', 'float8')).toBe('"NaN"');
    expect(json('Infinity', 'float8')).toBe('"Infinity"');
    expect(json('-Infinity', 'float4')).toBe('"-Infinity"');
  });

  it('json and jsonb spliced verbatim (large numbers not rounded)', () => {
    const big = '{"id": 12345678901234567890123, "ratio": 0.1000000000000000055511151231257827}';
    expect(json(big, 'jsonb')).toBe(big);
    // json keeps its text exactly: key order, duplicates, whitespace.
    const raw = '{ "b":1,\n  "a":[1, 2.50], "a":null }';
    expect(json(raw, 'json')).toBe(raw);
    expect(json('"just a string"', 'jsonb')).toBe('"just a string"');
    expect(json('null', 'jsonb')).toBe('null');
    expect(json('123456789012345678901234567890', 'jsonb')).toBe('123456789012345678901234567890');
  });

  // The json type (unlike jsonb) accepts the escape \u0000; cdc_events.before/after are jsonb,
  // which rejects it, so the COPY of that batch would fail on every retry and stall the source.
  // Such a value travels as its exact text, a JSON string. Checked against PostgreSQL 15.
  it('a json value holding \\u0000 still fits the jsonb buffer', () => {
    const out = json('{"a": "x\\u0000y"}', 'json');
    expect(hasNulEscape(out)).toBe(false);
  });

  it('text-like types as JSON strings, escaped', () => {
    expect(json('hello', 'text')).toBe('"hello"');
    expect(json('tab\there "q" back\\slash\nnewline é 🐘', 'text')).toBe(
      JSON.stringify('tab\there "q" back\\slash\nnewline é 🐘'),
    );
    expect(json('', 'varchar')).toBe('""');
    expect(json('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'uuid')).toBe(
      '"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"',
    );
    expect(json('P1Y2M3DT4H5M6.5S', 'interval')).toBe('"P1Y2M3DT4H5M6.5S"');
    expect(json('2026-11-25', 'date')).toBe('"2026-11-25"');
    expect(json('$1,234.50', 'money')).toBe('"1234.50"');
  });

  it('money as exact digits, whatever the locale wrote', () => {
    // en_US / C, de_DE, fr_FR (narrow no-break space), parentheses for negatives, ja_JP (no
    // decimals), a three-decimal currency.
    expect(moneyDigits('$1,234.50', 2)).toBe('1234.50');
    expect(moneyDigits('-$1,234.50', 2)).toBe('-1234.50');
    expect(moneyDigits('-1.234,50 €', 2)).toBe('-1234.50');
    expect(moneyDigits('1\u202f234,50\u00a0€', 2)).toBe('1234.50');
    expect(moneyDigits('($0.05)', 2)).toBe('-0.05');
    expect(moneyDigits('$0.00', 2)).toBe('0.00');
    expect(moneyDigits('-$92,233,720,368,547,758.08', 2)).toBe('-92233720368547758.08');
    expect(moneyDigits('￥1,235', 0)).toBe('1235');
    expect(moneyDigits('1,234.500 KWD', 3)).toBe('1234.500');
    // The probe: how the source prints 1234567 gives its decimals.
    expect(moneyType('$1,234,567.00')?.scale).toBe(2);
    expect(moneyType('￥1,234,567')?.scale).toBe(0);
    expect(moneyType('1.234.567,000 KWD')?.scale).toBe(3);
    expect(moneyType('garbled')).toBeNull();
  });

  it('bytea as its hex text', () => {
    expect(json('\\x00ff', 'bytea')).toBe('"\\\\x00ff"');
    expect(JSON.parse(json('\\x00ff', 'bytea'))).toBe('\\x00ff');
    expect(JSON.parse(json('\\x', 'bytea'))).toBe('\\x');
  });
});

describe('timestamps', () => {
  it('timestamptz to ISO-8601 with microseconds and Z', () => {
    expect(json('2026-11-25 00:50:18.12+00', 'timestamptz')).toBe('"2026-11-25T00:50:18.120000Z"');
    expect(json('2026-11-25 00:50:18+00', 'timestamptz')).toBe('"2026-11-25T00:50:18.000000Z"');
    expect(json('2026-11-25 00:50:18.123456+00', 'timestamptz')).toBe(
      '"2026-11-25T00:50:18.123456Z"',
    );
    expect(json('2026-11-25 00:50:18.000001-00', 'timestamptz')).toBe(
      '"2026-11-25T00:50:18.000001Z"',
    );
  });

  it('keeps a non-UTC offset, completing it to ±hh:mm', () => {
    expect(isoTimestamp('2026-11-25 05:50:18.5+05')).toBe('2026-11-25T05:50:18.500000+05:00');
    expect(isoTimestamp('2026-11-25 05:50:18+05:30')).toBe('2026-11-25T05:50:18.000000+05:30');
    expect(isoTimestamp('1900-01-01 00:00:00-00:53:28')).toBe(
      '1900-01-01T00:00:00.000000-00:53:28',
    );
  });

  it('timestamp without time zone: no zone suffix', () => {
    expect(json('2026-11-25 00:50:18.12', 'timestamp')).toBe('"2026-11-25T00:50:18.120000"');
    expect(json('1999-12-31 23:59:59', 'timestamp')).toBe('"1999-12-31T23:59:59.000000"');
  });

  it('infinity and BC dates stay as PostgreSQL prints them', () => {
    expect(json('infinity', 'timestamptz')).toBe('"infinity"');
    expect(json('-infinity', 'timestamp')).toBe('"-infinity"');
    expect(json('0044-03-15 12:00:00+00 BC', 'timestamptz')).toBe('"0044-03-15 12:00:00+00 BC"');
    expect(json('0044-03-15 12:00:00.5 BC', 'timestamp')).toBe('"0044-03-15 12:00:00.5 BC"');
  });

  it('years beyond 9999 keep all their digits', () => {
    expect(isoTimestamp('10000-01-01 00:00:00+00')).toBe('10000-01-01T00:00:00.000000Z');
  });
});

describe('arrays', () => {
  it('int4[] as numbers, int8[] and numeric[] as strings', () => {
    expect(json('{1,2,3}', '_int4')).toBe('[1,2,3]');
    expect(json('{9223372036854775807,-1}', '_int8')).toBe('["9223372036854775807","-1"]');
    expect(json('{1.50,NaN}', '_numeric')).toBe('["1.50","NaN"]');
  });

  it('empty arrays', () => {
    expect(json('{}', '_int4')).toBe('[]');
    expect(json('{}', '_text')).toBe('[]');
    expect(parseArrayLiteral('{}')).toEqual([]);
  });

  it('nested (multi-dimensional) arrays', () => {
    expect(json('{{1,2},{3,4}}', '_int4')).toBe('[[1,2],[3,4]]');
    expect(json('{{{1},{2}},{{3},{4}}}', '_int2')).toBe('[[[1],[2]],[[3],[4]]]');
    expect(json('{{a,NULL},{"b c",d}}', '_text')).toBe('[["a",null],["b c","d"]]');
  });

  it('unquoted NULL is SQL NULL, quoted "NULL" is the string', () => {
    expect(json('{NULL,"NULL",null}', '_text')).toBe('[null,"NULL","null"]');
    expect(json('{NULL,1}', '_int4')).toBe('[null,1]');
    expect(parseArrayLiteral('{NULL,"NULL"}')).toEqual([null, 'NULL']);
  });

  it('quoted elements with commas, quotes, braces, backslashes and blanks', () => {
    const text = '{"a,b","say \\"hi\\"","back\\\\slash","{not,nested}"," padded ","",plain}';
    expect(parseArrayLiteral(text)).toEqual([
      'a,b',
      'say "hi"',
      'back\\slash',
      '{not,nested}',
      ' padded ',
      '',
      'plain',
    ]);
    expect(JSON.parse(json(text, '_text'))).toEqual([
      'a,b',
      'say "hi"',
      'back\\slash',
      '{not,nested}',
      ' padded ',
      '',
      'plain',
    ]);
  });

  it('elements are converted with the element type', () => {
    expect(json('{t,f,NULL}', '_bool')).toBe('[true,false,null]');
    expect(json('{1.5,NaN,-Infinity}', '_float8')).toBe('[1.5,"NaN","-Infinity"]');
    expect(json('{"2026-11-25 00:50:18.12+00",infinity}', '_timestamptz')).toBe(
      '["2026-11-25T00:50:18.120000Z","infinity"]',
    );
    expect(json('{"\\\\x00ff","\\\\x"}', '_bytea')).toBe('["\\\\x00ff","\\\\x"]');
    expect(json('{"{\\"a\\": 12345678901234567890}",NULL}', '_jsonb')).toBe(
      '[{"a": 12345678901234567890},null]',
    );
  });

  it("box[] uses ';' as its delimiter", () => {
    const text = '{(3,4),(1,2);(10,10),(0,0)}';
    expect(parseArrayLiteral(text, ';')).toEqual(['(3,4),(1,2)', '(10,10),(0,0)']);
    expect(json(text, '_box')).toBe('["(3,4),(1,2)","(10,10),(0,0)"]');
  });

  it('skips a bounds prefix', () => {
    expect(parseArrayLiteral('[0:1]={1,2}')).toEqual(['1', '2']);
    // A JSON array has no lower bound: the PostgreSQL text travels instead, and reads back exactly.
    expect(json('[0:1]={1,2}', '_int4')).toBe('"[0:1]={1,2}"');
    expect(json('[1:2][3:4]={{1,2},{3,4}}', '_int4')).toBe('"[1:2][3:4]={{1,2},{3,4}}"');
  });

  it('rejects malformed literals', () => {
    expect(() => parseArrayLiteral('1,2')).toThrow(/malformed array literal/);
    expect(() => parseArrayLiteral('[0:1]{1,2}')).toThrow(/malformed array literal/);
    expect(() => parseArrayLiteral('{1,2]')).toThrow(/malformed array literal/);
  });
});

describe('writeJson: the byte path equals toJson', () => {
  const CONTROL = Array.from({ length: 32 }, (_, c) => String.fromCharCode(c)).join('');
  const SAMPLES: Record<string, string[]> = {
    text: [
      '',
      'plain',
      'say "hi"',
      'back\\slash \\N \\.',
      `every control character: ${CONTROL}`,
      'tab\there, new\nline, cr\r',
      'é ü ß 日本 🐘 \u2028 \u2029 \u007f',
      'x'.repeat(5000) + '"\n',
    ],
    bytea: ['\\x', '\\xdeadbeef00'],
    int4: ['0', '-2147483648', '2147483647'],
    int8: ['-9223372036854775808', '42'],
    numeric: ['12.50', 'NaN', '-0.000001', 'Infinity'],
    bool: ['t', 'f'],
    float8: ['1.5', '-0', '0', 'NaN', 'Infinity', '-Infinity', '1e+300', '-1.2345e-300', '+5'],
    float4: ['3.4028235e+38', '-0', '-1'],
    uuid: ['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'],
    date: ['2026-11-25', 'infinity', '4713-01-01 BC'],
    timestamptz: [
      '2026-11-25 00:50:18+00',
      '2026-11-25 00:50:18.1+00',
      '2026-11-25 00:50:18.123456+00',
      '2026-11-25 00:50:18.+00',
      '2026-11-25 00:50:18.12+05:30',
      '2026-11-25 00:50:18.12-08',
      '12026-11-25 00:50:18+00',
      '0044-03-15 12:00:00+00 BC',
      'infinity',
      '-infinity',
    ],
    timestamp: ['2026-11-25 00:50:18', '2026-11-25 00:50:18.999999', '1999-12-31 23:59:59.5 BC'],
    json: [
      '{"a": 1}',
      '{"n":\n\t12345678901234567890}',
      '"\\u0000"',
      '{"a":"\\\\u0000"}',
      '["\\\\", "\\"", "\\n", "\\u00e9"]',
      '{"k\\u0000": 1}',
      'null',
    ],
    jsonb: ['{"a": [1, 2.50, "é"]}', '"\\u0000x"'],
    _int4: ['{1,2,NULL}', '[0:1]={1,2}', '{}', '{7}', '{NULL}', '{-1,2,3}', '{{1,2},{3,4}}'],
    _text: [
      '{"a b","\\"q\\"",NULL,"NULL"}',
      '{a,b,c}',
      '{NULL,x,null}',
      '{é,ü,日本,🐘}',
      '{a\u0001b,tab}',
      '{{a,b},{c,d}}',
      '{}',
    ],
    _int8: ['{1,-9223372036854775808,NULL}'],
    _numeric: ['{1.50,NaN,-0.000001}'],
    _uuid: ['{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}'],
    _date: ['{2026-11-25,infinity}', '{"4713-01-01 BC"}'],
    _bool: ['{t,f,NULL}'],
    _float8: ['{1.5,NaN,-0}'],
    interval: ['P1Y2M3DT4H5M6.5S'],
    inet: ['192.168.0.1/24'],
    money: ['$1,000.00', '-1.234,50 €'],
  };

  for (const [typeName, texts] of Object.entries(SAMPLES)) {
    it(typeName, () => {
      const t = type(typeName);
      const view = tupleView(texts);
      for (let i = 0; i < texts.length; i++) {
        const out = new CopyBuffer(4);
        writeJson(out, view, i, t);
        const written = out.buf.toString('utf8', 0, out.length);
        expect(written, JSON.stringify(texts[i])).toBe(toJson(texts[i]!, t));
      }
    });
  }

  it('a large value: sized by counting its escapes, the same JSON', () => {
    const text = `${'a"\\\n\u0001é'.repeat(40_000)}🐘`;
    const out = new CopyBuffer(16);
    writeJson(out, tupleView([text]), 0, TEXT_TYPE);
    expect(out.buf.toString('utf8', 0, out.length)).toBe(JSON.stringify(text));
  });

  it('lets go of a buffer one huge row grew, once it is taken, handing it over without a copy', () => {
    const out = new CopyBuffer(1024, 4096);
    out.bytes(Buffer.from('head'));
    out.bytes(Buffer.alloc(100_000, 120)); // a large value: room for it and its row, not 2×
    expect(out.buf.length).toBeLessThan(2 * 100_004);
    const before = out.buf.buffer;
    const data = out.take();
    expect(data).toBe(before); // the same memory, trimmed
    expect(data.byteLength).toBe(100_004);
    expect(Buffer.from(data).subarray(0, 6).toString()).toBe('headxx');
    expect(out.buf.length).toBe(1024);
    out.bytes(Buffer.alloc(1500, 120));
    out.take();
    expect(out.buf.length).toBe(2048); // doubled, and within what it keeps
  });

  it('places a segment by reference: field lengths count it, truncate drops it, the pieces reassemble', () => {
    const out = new CopyBuffer(64);
    out.int16(1);
    const field = out.openField();
    out.byte(0x22);
    const big = Buffer.alloc(3000, 0x61);
    out.segment(big);
    out.byte(0x22);
    out.closeField(field);
    expect(out.size).toBe(out.length + 3000);
    const rowEnd = out.length;
    out.int16(1);
    out.openField();
    out.segment(Buffer.from('dropped'));
    out.truncate(rowEnd); // a half row goes, with its segment
    const { data, segments } = out.takeAll();
    expect(segments).toHaveLength(1);
    const whole = Buffer.concat(copyPieces(data, segments));
    expect(whole.readInt16BE(0)).toBe(1);
    expect(whole.readInt32BE(2)).toBe(3002);
    expect(whole.subarray(6).toString()).toBe(`"${'a'.repeat(3000)}"`);
    expect(out.size).toBe(0);
  });

  it('writes binary integers and fields as PostgreSQL reads them', () => {
    const out = new CopyBuffer(1);
    const values = [
      0,
      1,
      -1,
      2 ** 32 + 0x16b3748,
      2 ** 53 - 1,
      -(2 ** 53 - 1),
      -946_684_800_000_000,
    ];
    for (const n of values) out.int64(n);
    out.int32(-2);
    out.int16(12);
    out.nullField();
    out.textField('é\t"x"');
    out.textArrayField([]);
    out.textArrayField(['id', 'ü']);
    const b = out.buf.subarray(0, out.length);
    let p = 0;
    for (const n of values) {
      expect(b.readBigInt64BE(p)).toBe(BigInt(n));
      p += 8;
    }
    expect(b.readInt32BE(p)).toBe(-2);
    expect(b.readInt16BE(p + 4)).toBe(12);
    expect(b.readInt32BE(p + 6)).toBe(-1);
    p += 10;
    expect(b.readInt32BE(p)).toBe(6); // bytes, not characters
    expect(b.toString('utf8', p + 4, p + 10)).toBe('é\t"x"');
    p += 10;
    // An empty text[]: no dimensions, no NULLs, element type text.
    expect([
      b.readInt32BE(p),
      b.readInt32BE(p + 4),
      b.readInt32BE(p + 8),
      b.readInt32BE(p + 12),
    ]).toEqual([12, 0, 0, 25]);
    p += 16;
    // ['id', 'ü']: one dimension of 2 from 1, then each element with its length.
    expect(b.readInt32BE(p)).toBe(12 + 8 + 6 + 6);
    expect([
      b.readInt32BE(p + 4),
      b.readInt32BE(p + 8),
      b.readInt32BE(p + 12),
      b.readInt32BE(p + 16),
      b.readInt32BE(p + 20),
    ]).toEqual([1, 0, 25, 2, 1]);
    expect(b.readInt32BE(p + 24)).toBe(2);
    expect(b.toString('utf8', p + 28, p + 30)).toBe('id');
    expect(b.readInt32BE(p + 30)).toBe(2);
    expect(b.toString('utf8', p + 34, p + 36)).toBe('ü');
    expect(p + 36).toBe(b.length);
  });
});
