/**
 * PostgreSQL text-format values to JSON text, without loss.
 *
 * pgoutput sends each value in the type's text output format, produced with the replication
 * session's settings (the reader pins DateStyle=ISO, TimeZone=UTC, IntervalStyle=iso_8601,
 * bytea_output=hex, extra_float_digits=3). We turn that text straight into a JSON fragment:
 * no Date objects (they lose microseconds), no float parsing of int8/numeric (it loses digits),
 * and json/jsonb spliced verbatim (re-parsing would round large numbers).
 */

import type { CopyBuffer } from './copy-buffer.js';
import type { TupleView } from './pgoutput.js';

export type ValueKind =
  | 'bool'
  | 'number' // int2, int4, oid and friends: the text is already a JSON number
  | 'float' // float4/float8: a JSON number, or a string for NaN and ±Infinity
  | 'string' // text and anything without a better JSON form
  | 'quoted' // int8, numeric, uuid, dates…: a JSON string whose text never needs escaping
  | 'json' // json and jsonb: spliced as is
  | 'timestamp' // without time zone: ISO-8601 with microseconds, no zone
  | 'timestamptz' // ISO-8601 with microseconds, 'Z'
  | 'bytea' // '\x…' hex, PostgreSQL's own input format
  | 'money' // exact digits ("-1234.56"), from the locale's format; see moneyDigits
  | 'array';

export interface TypeInfo {
  readonly oid: number;
  readonly name: string;
  readonly kind: ValueKind;
  /** For arrays: the element type and its delimiter (';' for box, ',' for the rest). */
  readonly element?: TypeInfo;
  readonly delimiter?: string;
  /** For money: the digits after the decimal point in the source's lc_monetary. */
  readonly scale?: number;
  /**
   * A type Philotes has no rule of its own for (an extension's type, a composite, a range): its
   * value is its text output as a JSON string, which reads back with the type's input function.
   * The schema history says so (`encoding: "text"`).
   */
  readonly textForm?: boolean;
}

const scalar = (oid: number, name: string, kind: ValueKind): TypeInfo => ({ oid, name, kind });

const SCALARS: readonly TypeInfo[] = [
  scalar(16, 'bool', 'bool'),
  scalar(17, 'bytea', 'bytea'),
  scalar(18, 'char', 'string'),
  scalar(19, 'name', 'string'),
  scalar(20, 'int8', 'quoted'),
  scalar(21, 'int2', 'number'),
  // Space-separated numbers ('1 2 3'), not array literals, although their category is array.
  scalar(22, 'int2vector', 'string'),
  scalar(23, 'int4', 'number'),
  scalar(24, 'regproc', 'string'),
  scalar(25, 'text', 'string'),
  scalar(26, 'oid', 'number'),
  scalar(27, 'tid', 'quoted'),
  scalar(28, 'xid', 'number'),
  scalar(29, 'cid', 'number'),
  scalar(30, 'oidvector', 'string'),
  scalar(114, 'json', 'json'),
  scalar(142, 'xml', 'string'),
  scalar(600, 'point', 'string'),
  scalar(601, 'lseg', 'string'),
  scalar(602, 'path', 'string'),
  scalar(603, 'box', 'string'),
  scalar(604, 'polygon', 'string'),
  scalar(628, 'line', 'string'),
  scalar(650, 'cidr', 'quoted'),
  scalar(700, 'float4', 'float'),
  scalar(701, 'float8', 'float'),
  scalar(718, 'circle', 'string'),
  scalar(774, 'macaddr8', 'quoted'),
  // lc_monetary's usual 2 decimals; each reader asks its source (moneyType).
  { oid: 790, name: 'money', kind: 'money', scale: 2 },
  scalar(829, 'macaddr', 'quoted'),
  scalar(869, 'inet', 'quoted'),
  scalar(1042, 'bpchar', 'string'),
  scalar(1043, 'varchar', 'string'),
  scalar(1082, 'date', 'quoted'),
  scalar(1083, 'time', 'quoted'),
  scalar(1114, 'timestamp', 'timestamp'),
  scalar(1184, 'timestamptz', 'timestamptz'),
  scalar(1186, 'interval', 'quoted'),
  scalar(1266, 'timetz', 'quoted'),
  scalar(1560, 'bit', 'quoted'),
  scalar(1562, 'varbit', 'quoted'),
  scalar(1700, 'numeric', 'quoted'),
  scalar(2950, 'uuid', 'quoted'),
  scalar(3220, 'pg_lsn', 'quoted'),
  scalar(3614, 'tsvector', 'string'),
  scalar(3615, 'tsquery', 'string'),
  scalar(3802, 'jsonb', 'json'),
  scalar(4089, 'regnamespace', 'string'),
  scalar(5069, 'xid8', 'quoted'),
];

/** [array oid, element oid] for the built-in array types. */
const ARRAYS: ReadonlyArray<readonly [number, number]> = [
  [1000, 16],
  [1001, 17],
  [1002, 18],
  [1003, 19],
  [1016, 20],
  [1005, 21],
  [1007, 23],
  [1008, 24],
  [1009, 25],
  [1028, 26],
  [1010, 27],
  [1011, 28],
  [1012, 29],
  [1006, 22],
  [1013, 30],
  [199, 114],
  [143, 142],
  [1017, 600],
  [1018, 601],
  [1019, 602],
  [1020, 603],
  [1027, 604],
  [629, 628],
  [651, 650],
  [1021, 700],
  [1022, 701],
  [719, 718],
  [775, 774],
  [791, 790],
  [1040, 829],
  [1041, 869],
  [1014, 1042],
  [1015, 1043],
  [1182, 1082],
  [1183, 1083],
  [1115, 1114],
  [1185, 1184],
  [1187, 1186],
  [1270, 1266],
  [1561, 1560],
  [1563, 1562],
  [1231, 1700],
  [2951, 2950],
  [3221, 3220],
  [3643, 3614],
  [3645, 3615],
  [3807, 3802],
  [271, 5069],
];

export const BUILTIN_TYPES: ReadonlyMap<number, TypeInfo> = (() => {
  const map = new Map<number, TypeInfo>();
  for (const t of SCALARS) map.set(t.oid, t);
  for (const [arrayOid, elementOid] of ARRAYS) {
    const element = map.get(elementOid);
    if (!element) throw new Error(`no element type ${elementOid}`);
    map.set(arrayOid, {
      oid: arrayOid,
      name: `_${element.name}`,
      kind: 'array',
      element,
      delimiter: element.name === 'box' ? ';' : ',',
    });
  }
  return map;
})();

export const TEXT_TYPE: TypeInfo = BUILTIN_TYPES.get(25)!;

function isDigit(code: number): boolean {
  return code >= 48 && code <= 57;
}

/** An unescaped \u0000 in JSON text (preceded by an even number of backslashes). */
const JSON_NUL_ESCAPE = /(^|[^\\])(\\\\)*\\u0000/;

const TIMESTAMP =
  /^(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?([+-]\d\d(?::\d\d(?::\d\d)?)?)?$/;

/** '2026-11-25 00:50:18.12+00' -> '2026-11-25T00:50:18.120000Z'. BC dates and ±infinity stay as PostgreSQL prints them. */
export function isoTimestamp(text: string): string {
  // Fast path for what DateStyle=ISO, TimeZone=UTC prints: 'YYYY-MM-DD HH:MM:SS[.f…][+00]'.
  if (text.length >= 19 && text.charCodeAt(4) === 45 && text.charCodeAt(10) === 32) {
    let end = 19;
    if (text.charCodeAt(19) === 46) {
      end = 20;
      while (end < text.length && end < 26 && isDigit(text.charCodeAt(end))) end++;
    }
    const rest = text.length === end ? '' : text.slice(end);
    if (rest === '' || rest === '+00') {
      const fraction = end > 20 ? text.slice(20, end).padEnd(6, '0') : '000000';
      return `${text.slice(0, 10)}T${text.slice(11, 19)}.${fraction}${rest === '' ? '' : 'Z'}`;
    }
  }
  const m = TIMESTAMP.exec(text);
  if (!m) return text;
  const fraction = (m[7] ?? '').padEnd(6, '0');
  const zone = m[8];
  let suffix = '';
  if (zone !== undefined) {
    suffix = zone === '+00' || zone === '-00' ? 'Z' : zone.length === 3 ? `${zone}:00` : zone;
  }
  return `${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6]}.${fraction}${suffix}`;
}

/** One PostgreSQL text value as a JSON fragment. */
export function toJson(text: string, type: TypeInfo): string {
  switch (type.kind) {
    case 'bool':
      return text === 't' ? 'true' : 'false';
    case 'number':
      return text;
    case 'float':
      // NaN and ±Infinity have no JSON number form, and jsonb turns the number -0 into 0.
      return /^[-+]?(NaN|Infinity)$|^-0$/.test(text) ? JSON.stringify(text) : text;
    case 'json':
      // json (not jsonb) accepts the escape \u0000, which the buffer's jsonb columns reject; such a
      // value travels as its exact text instead of stalling the source on a failing COPY.
      return JSON_NUL_ESCAPE.test(text) ? JSON.stringify(text) : text;
    case 'timestamp':
    case 'timestamptz':
      return `"${isoTimestamp(text)}"`;
    case 'quoted':
      // Their output is digits, letters and punctuation other than '"' and '\'.
      return `"${text}"`;
    case 'array':
      return arrayToJson(text, type);
    case 'money':
      return `"${moneyDigits(text, type.scale ?? 2)}"`;
    case 'string':
    case 'bytea':
      return JSON.stringify(text);
  }
}

/**
 * A money value as exact digits. The walsender writes money in its lc_monetary format — a
 * currency symbol, thousands separators, a locale's decimal point, a minus sign or parentheses —
 * always with `scale` decimals. So the digits are the amount, the last `scale` of them the
 * fraction: "-$1,234.50" and "-1.234,50 €" are both "-1234.50".
 */
export function moneyDigits(text: string, scale: number): string {
  const negative = text.includes('-') || text.trimStart().startsWith('(');
  const digits = text.replace(/[^0-9]/g, '').padStart(scale + 1, '0');
  const whole = digits.slice(0, digits.length - scale).replace(/^0+(?=\d)/, '');
  const amount = scale > 0 ? `${whole}.${digits.slice(digits.length - scale)}` : whole;
  return negative && /[1-9]/.test(amount) ? `-${amount}` : amount;
}

/**
 * The money type as a source writes it: `sample` is how it prints 1234567 (the probe's value,
 * a whole number so that no locale rounds it), so the digits past its seven are the decimals of
 * its lc_monetary. Null if the sample does not look like that (then money travels as the text
 * the source wrote).
 */
export function moneyType(sample: string): TypeInfo | null {
  const digits = sample.replace(/[^0-9]/g, '');
  if (!digits.startsWith('1234567') || digits.length > 7 + 4) return null;
  return { oid: 790, name: 'money', kind: 'money', scale: digits.length - 7 };
}

/**
 * Column i of a tuple (a 't' value) as a JSON fragment, written into `out` straight from the
 * message bytes. The common kinds are done byte by byte; whatever does not fit their
 * fast path (arrays, NaN, BC dates, json holding \u0000) goes through toJson on the text.
 */
export function writeJson(out: CopyBuffer, tuple: TupleView, i: number, type: TypeInfo): void {
  const src = tuple.buf;
  const start = tuple.starts[i]!;
  const end = tuple.ends[i]!;
  if (
    end - start >= SEGMENT_MIN_BYTES &&
    tuple.owned &&
    // Its ArrayBuffer is transferred with the batch: it must hold this message and nothing else.
    src.byteOffset === 0 &&
    src.buffer.byteLength === src.length &&
    writeSegment(out, src, start, end, type)
  )
    return;
  switch (type.kind) {
    case 'number':
      out.bytes(src, start, end);
      return;
    case 'bool':
      out.text(src[start] === 0x74 ? 'true' : 'false');
      return;
    case 'quoted':
      out.byte(0x22);
      out.bytes(src, start, end);
      out.byte(0x22);
      return;
    case 'string':
    case 'bytea':
      out.jsonString(src, start, end);
      return;
    case 'float':
      if (isPlainFloat(src, start, end)) {
        out.bytes(src, start, end);
        return;
      }
      break;
    case 'timestamp':
    case 'timestamptz':
      if (writeIsoTimestamp(out, src, start, end)) return;
      break;
    case 'json':
      if (out.jsonVerbatim(src, start, end)) return;
      break;
    case 'array':
      if (writeFlatArray(out, src, start, end, type)) return;
      break;
    case 'money':
      break;
  }
  out.text(toJson(tuple.text(i), type));
}

/** A value this large, in a message buffer of its own, goes to the batch by reference. */
const SEGMENT_MIN_BYTES = 1 << 20;

/**
 * A large text, bytea or json value by reference: its bytes stay in the message buffer, which
 * goes to the supervisor with the batch, instead of being copied into the batch (see
 * CopyBuffer.segment). False, nothing written, when the value needs escaping.
 */
function writeSegment(
  out: CopyBuffer,
  src: Buffer,
  start: number,
  end: number,
  type: TypeInfo,
): boolean {
  switch (type.kind) {
    case 'string':
      return out.jsonStringSegment(src, start, end);
    case 'bytea':
      // '\x' then hex digits: the backslash is JSON-escaped, the digits go as they are.
      return src[start] === 0x5c && src[start + 1] === 0x78
        ? out.jsonStringSegment(src, start + 2, end, '\\\\x')
        : false;
    case 'json':
      return out.jsonSegment(src, start, end);
    default:
      return false;
  }
}

/**
 * The byte form of toJson for the common array: one dimension, default bounds, no element quoted
 * (array_out quotes any element holding a delimiter, brace, quote, backslash or space, an empty
 * one, and the string NULL), elements of kinds whose JSON is their text, quoted or escaped. An
 * unquoted NULL is SQL NULL. False, nothing written, for anything else (toJson does it).
 */
function writeFlatArray(
  out: CopyBuffer,
  src: Uint8Array,
  start: number,
  end: number,
  type: TypeInfo,
): boolean {
  const kind = type.element?.kind;
  if (kind !== 'string' && kind !== 'number' && kind !== 'quoted') return false;
  if ((type.delimiter ?? ',') !== ',') return false;
  if (end - start < 2 || src[start] !== 0x7b || src[end - 1] !== 0x7d) return false; // { }
  for (let k = start + 1; k < end - 1; k++) {
    const c = src[k]!;
    if (c === 0x22 || c === 0x5c || c === 0x7b || c === 0x7d) return false; // " \ { }
  }
  out.byte(0x5b); // [
  let from = start + 1;
  const last = end - 1;
  if (from < last) {
    for (let k = from; k <= last; k++) {
      if (k < last && src[k] !== 0x2c) continue; // ,
      if (from !== start + 1) out.byte(0x2c);
      if (
        k - from === 4 &&
        src[from] === 0x4e && // N
        src[from + 1] === 0x55 && // U
        src[from + 2] === 0x4c && // L
        src[from + 3] === 0x4c // L
      )
        out.bytes(NULL_TEXT);
      else if (kind === 'number') out.bytes(src, from, k);
      else if (kind === 'string') out.jsonString(src, from, k);
      else {
        out.byte(0x22);
        out.bytes(src, from, k);
        out.byte(0x22);
      }
      from = k + 1;
    }
  }
  out.byte(0x5d); // ]
  return true;
}

const NULL_TEXT = new TextEncoder().encode('null');

/** Not NaN, ±Infinity or -0 (which need the string form; see toJson). */
function isPlainFloat(src: Uint8Array, start: number, end: number): boolean {
  let first = src[start];
  if (first === 0x2d || first === 0x2b) {
    if (end - start === 2 && first === 0x2d && src[start + 1] === 0x30) return false; // -0
    first = src[start + 1];
  }
  return first !== 0x4e && first !== 0x49; // 'N'aN, 'I'nfinity
}

/** The byte form of isoTimestamp's fast path; false when the text needs the slow path. */
function writeIsoTimestamp(out: CopyBuffer, src: Uint8Array, start: number, end: number): boolean {
  const len = end - start;
  if (len < 19 || src[start + 4] !== 0x2d || src[start + 10] !== 0x20) return false;
  let fractionEnd = start + 19;
  if (src[fractionEnd] === 0x2e && fractionEnd < end) {
    fractionEnd++;
    while (fractionEnd < end && fractionEnd < start + 26 && isDigit(src[fractionEnd]!))
      fractionEnd++;
  }
  const rest = end - fractionEnd;
  const utc =
    rest === 3 &&
    src[fractionEnd] === 0x2b &&
    src[fractionEnd + 1] === 0x30 &&
    src[fractionEnd + 2] === 0x30;
  if (rest !== 0 && !utc) return false;
  out.ensure(30);
  const o = out.buf;
  let p = out.length;
  o[p++] = 0x22;
  for (let k = start; k < start + 10; k++) o[p++] = src[k]!;
  o[p++] = 0x54; // T
  for (let k = start + 11; k < start + 19; k++) o[p++] = src[k]!;
  o[p++] = 0x2e;
  let digits = 0;
  for (let k = start + 20; k < fractionEnd; k++, digits++) o[p++] = src[k]!;
  for (; digits < 6; digits++) o[p++] = 0x30;
  if (utc) o[p++] = 0x5a; // Z
  o[p++] = 0x22;
  out.length = p;
  return true;
}

type ArrayItem = string | null | ArrayItem[];

function arrayToJson(text: string, type: TypeInfo): string {
  // Explicit lower bounds ('[0:1]={1,2}') have no JSON array form: keep PostgreSQL's text, which
  // reads back exactly.
  if (text.startsWith('[')) return JSON.stringify(text);
  const element = type.element ?? TEXT_TYPE;
  const parsed = parseArrayLiteral(text, type.delimiter ?? ',');
  const render = (item: ArrayItem): string =>
    item === null
      ? 'null'
      : Array.isArray(item)
        ? `[${item.map(render).join(',')}]`
        : toJson(item, element);
  return render(parsed);
}

/**
 * The elements of a json[]/jsonb[] value that are the JSON document null, as PostgreSQL
 * subscripts ('[2]', '[1][3]'): in the array's JSON they are null like a SQL NULL element.
 * An array with explicit bounds travels as its text, which is not ambiguous.
 */
export function jsonNullElements(text: string, type: TypeInfo): string[] {
  if (text.startsWith('[')) return [];
  const found: string[] = [];
  const walk = (items: ArrayItem[], path: string): void => {
    items.forEach((item, k) => {
      const at = `${path}[${k + 1}]`;
      if (Array.isArray(item)) walk(item, at);
      else if (item !== null && item.trim() === 'null') found.push(at);
    });
  };
  const parsed = parseArrayLiteral(text, type.delimiter ?? ',');
  if (Array.isArray(parsed)) walk(parsed, '');
  return found;
}

/**
 * Parses PostgreSQL's array output ('{1,NULL,"a b",{2,3}}', optionally prefixed with bounds
 * such as '[0:1]='). Quoted elements may contain the delimiter, braces and backslash escapes;
 * an unquoted NULL is SQL NULL, a quoted "NULL" is the string.
 */
export function parseArrayLiteral(text: string, delimiter = ','): ArrayItem[] {
  let i = 0;
  if (text[0] === '[') {
    const eq = text.indexOf('=');
    if (eq < 0) throw new Error(`malformed array literal: ${text.slice(0, 40)}`);
    i = eq + 1;
  }
  const parseLevel = (): ArrayItem[] => {
    if (text[i] !== '{') throw new Error(`malformed array literal at ${i}: ${text.slice(0, 40)}`);
    i++;
    const items: ArrayItem[] = [];
    if (text[i] === '}') {
      i++;
      return items;
    }
    for (;;) {
      const c = text[i];
      if (c === '{') {
        items.push(parseLevel());
      } else if (c === '"') {
        i++;
        let out = '';
        while (i < text.length && text[i] !== '"') {
          if (text[i] === '\\') i++;
          out += text[i];
          i++;
        }
        i++; // closing quote
        items.push(out);
      } else {
        let out = '';
        while (i < text.length && text[i] !== delimiter && text[i] !== '}') {
          if (text[i] === '\\') i++;
          out += text[i];
          i++;
        }
        items.push(out === 'NULL' ? null : out);
      }
      const next = text[i];
      i++;
      if (next === '}') return items;
      if (next !== delimiter)
        throw new Error(`malformed array literal at ${i - 1}: ${text.slice(0, 40)}`);
    }
  };
  return parseLevel();
}
