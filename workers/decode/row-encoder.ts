/**
 * The row encoder, the hot path: one change's cdc_events row in binary COPY format, written
 * straight from the message's bytes into the batch's (see copy-buffer.ts); a row allocates
 * nothing. The images are jsonb (version byte, then JSON text with the keys in jsonb's own
 * order, which spares the buffer a sort). Framing — transactions, batches, streamed
 * transactions, schema versions — is event-rows.ts's; this file knows one row at a time.
 */
import type { ColumnInfo, SchemaChange } from '../../src/common/protocol.js';
import { EVENT_COPY_COLUMNS } from '../../src/common/buffer-format.js';
import { FatalSourceError } from '../../src/common/errors.js';
import { formatLsn } from '../../src/common/lsn.js';
import { resetCommand, type SourceRef } from '../../src/common/source-names.js';
import { CopyBuffer } from './copy-buffer.js';
import type { TupleView } from './pgoutput.js';
import { jsonNullElements, writeJson, type TypeInfo } from './values.js';

/** The largest seq cdc_events (an int column) can hold. */
export const MAX_SEQ = 2 ** 31 - 1;

export interface ResolvedColumn {
  readonly name: string;
  readonly type: TypeInfo;
  readonly typeMod: number;
  /** Part of the replica identity (what a 'K' old tuple carries). */
  readonly key: boolean;
}

export interface ResolvedRelation {
  readonly oid: number;
  readonly schema: string;
  readonly table: string;
  readonly columns: readonly ResolvedColumn[];
  readonly primaryKey: readonly string[];
}

export interface RelationEncoding {
  readonly relation: ResolvedRelation;
  /** '"name":' for each column, UTF-8, computed once. */
  readonly keys: readonly Uint8Array[];
  /**
   * The order to write columns in: jsonb's own key order (shorter names first, then bytewise).
   * jsonb keeps no order of its own, and input already in its order spares the buffer a sort.
   */
  readonly order: Int32Array;
  /** The schema_name and table_name fields. */
  readonly location: Uint8Array;
  /** The primary_key field. */
  readonly primaryKey: Uint8Array;
  /** A new shape, recorded with the first change that uses it (see relation()). */
  pendingSchema: Omit<SchemaChange, 'lsn'> | null;
}

/**
 * The open transaction's fixed fields, prepared once per transaction as bytes, and where it is
 * (for errors). The framing owns it and rewrites it at every begin.
 */
export interface RowFrame {
  /** Field count, source_id, lsn. */
  readonly head: CopyBuffer;
  /** xid, committed_at. */
  readonly middle: CopyBuffer;
  readonly sourceId: string;
  /** The source as a suggested command names it (with its --config). */
  readonly source: SourceRef;
  /** The transaction's final LSN (its commit's), or a streamed transaction's xid. */
  finalLsn: number;
}

/** Prepared fields: a value's bytes once, copied into every row that needs them. */
export function fields(write: (out: CopyBuffer) => void): Uint8Array {
  const out = new CopyBuffer(64);
  write(out);
  return out.buf.subarray(0, out.length);
}

export const FIELD_COUNT = EVENT_COPY_COLUMNS.length;
const NULL_FIELD = fields((out) => out.nullField());
const NULL_JSON = Buffer.from('null');
const JSONB_VERSION = 1;
export const OPERATIONS = {
  INSERT: fields((out) => out.textField('INSERT')),
  UPDATE: fields((out) => out.textField('UPDATE')),
  DELETE: fields((out) => out.textField('DELETE')),
  TRUNCATE: fields((out) => out.textField('TRUNCATE')),
  MESSAGE: fields((out) => out.textField('MESSAGE')),
  DDL: fields((out) => out.textField('DDL')),
  SNAPSHOT: fields((out) => out.textField('SNAPSHOT')),
} as const;

/** An event that is no row: it names a table (or none, ''), with that table's key. */
export function tableOnlyEncoding(
  schema: string,
  table: string,
  primaryKey: string[],
): RelationEncoding {
  return {
    relation: { oid: 0, schema, table, columns: [], primaryKey },
    keys: [],
    order: new Int32Array(0),
    location: fields((out) => {
      out.textField(schema);
      out.textField(table);
    }),
    primaryKey: fields((out) => out.textArrayField(primaryKey)),
    pendingSchema: null,
  };
}

/** A logical message names no table: empty schema and table names, no key. */
export const MESSAGE_ENCODING = tableOnlyEncoding('', '', []);

/** jsonb's key order: by length in bytes, then bytewise. */
function jsonbKeyOrder(names: readonly string[]): Int32Array {
  const bytes = names.map((n) => Buffer.from(n, 'utf8'));
  const order = names.map((_, i) => i);
  order.sort((a, b) => bytes[a]!.length - bytes[b]!.length || Buffer.compare(bytes[a]!, bytes[b]!));
  return Int32Array.from(order);
}

/**
 * A relation's encoding: its column keys and their jsonb order, its location and key fields;
 * `pendingSchema` is the schema version it makes, if its shape differs from `previous`'s.
 */
export function relationEncoding(
  relation: ResolvedRelation,
  previous: RelationEncoding | undefined,
): RelationEncoding {
  const shapeChanged = !previous || !sameShape(previous.relation, relation);
  return {
    relation,
    keys: relation.columns.map((c) => Buffer.from(`${JSON.stringify(c.name)}:`)),
    order: jsonbKeyOrder(relation.columns.map((c) => c.name)),
    location: fields((out) => {
      out.textField(relation.schema);
      out.textField(relation.table);
    }),
    primaryKey: fields((out) => out.textArrayField(relation.primaryKey)),
    pendingSchema: shapeChanged
      ? {
          schema: relation.schema,
          table: relation.table,
          columns: relation.columns.map((c): ColumnInfo => ({
            name: c.name,
            type: c.type.name,
            typeOid: c.type.oid,
            typeMod: c.typeMod,
            key: c.key,
            ...(c.type.textForm || c.type.element?.textForm ? { encoding: 'text' as const } : {}),
          })),
          primaryKey: [...relation.primaryKey],
        }
      : (previous.pendingSchema ?? null),
  };
}

/** Column texts as a pgoutput TupleData ('t' values, 'n' for NULL), for TupleView. */
export function tupleBytes(values: ReadonlyArray<string | null>): Buffer {
  const parts: Buffer[] = [];
  const count = Buffer.alloc(2);
  count.writeInt16BE(values.length);
  parts.push(count);
  for (const v of values) {
    if (v === null) {
      parts.push(Buffer.from('n'));
      continue;
    }
    const text = Buffer.from(v, 'utf8');
    const head = Buffer.alloc(5);
    head[0] = 0x74; // 't'
    head.writeInt32BE(text.length, 1);
    parts.push(head, text);
  }
  return Buffer.concat(parts);
}

/**
 * Writes one cdc_events row into `out`: the frame's fields, `seq`, the relation's, the operation,
 * the images, the key, the unchanged columns and details. A row that fails is taken back whole:
 * no half row in the batch.
 */
export function writeEventRow(
  out: CopyBuffer,
  frame: RowFrame,
  seq: number,
  enc: RelationEncoding,
  operation: Uint8Array,
  before: TupleView | null,
  beforeKeyOnly: boolean,
  after: TupleView | null,
  fallback: TupleView | null,
  details: string | null,
): void {
  const rowStart = out.length;
  try {
    out.bytes(frame.head.buf, 0, frame.head.length);
    out.int32Field(seq);
    out.bytes(frame.middle.buf, 0, frame.middle.length);
    out.bytes(enc.location);
    out.bytes(operation);
    const beforeImage = before ? writeJsonb(out, frame, enc, before, beforeKeyOnly, null) : null;
    if (!before) out.bytes(NULL_FIELD);
    const afterImage = after ? writeJsonb(out, frame, enc, after, false, fallback) : null;
    if (!after) out.bytes(NULL_FIELD);
    out.bytes(enc.primaryKey);
    const unchanged = afterImage?.unchanged ?? null;
    if (unchanged) out.textArrayField(unchanged);
    else out.bytes(NULL_FIELD);
    // A json/jsonb column holding the JSON document null looks like SQL NULL in the image:
    // details names such columns, so that a replay can tell them apart.
    if (details === null && (beforeImage?.jsonNulls || afterImage?.jsonNulls)) {
      details = JSON.stringify({
        json_null: {
          ...(beforeImage?.jsonNulls ? { before: beforeImage.jsonNulls } : {}),
          ...(afterImage?.jsonNulls ? { after: afterImage.jsonNulls } : {}),
        },
      });
    }
    if (details === null) out.bytes(NULL_FIELD);
    else {
      const field = out.openField();
      out.byte(JSONB_VERSION);
      out.text(details);
      out.closeField(field);
    }
  } catch (error) {
    out.truncate(rowStart);
    throw error;
  }
}

/** The change past the last seq a transaction can number. */
export function tooManyChangesError(
  frame: RowFrame,
  enc: RelationEncoding,
  changes: number,
): FatalSourceError {
  const lsn = formatLsn(BigInt(frame.finalLsn));
  return new FatalSourceError(
    `the transaction committed at ${lsn} has more than ${MAX_SEQ} changes (its latest to ${enc.relation.schema}.${enc.relation.table}): cdc_events.seq cannot number more within one transaction. Capture cannot pass it; to skip it (a gap, recorded): ${resetCommand(frame.source, ' --skip-to-current')}`,
    'TRANSACTION_TOO_LARGE',
    { lsn, changes },
  );
}

/**
 * A value the encoder has no lossless form for: a bug of ours, never a reason to retry (the
 * same WAL would fail the same way forever). The source stops naming where it is.
 */
function unencodableError(
  frame: RowFrame,
  enc: RelationEncoding,
  column: string,
  type: TypeInfo,
  text: string,
  cause: unknown,
): FatalSourceError {
  const { schema, table } = enc.relation;
  const lsn = formatLsn(BigInt(frame.finalLsn));
  return new FatalSourceError(
    `cannot encode the value of column "${column}" of ${schema}.${table} (type ${type.name}, oid ${type.oid}) in the transaction committed at ${lsn}: ${(cause as Error)?.message ?? String(cause)}. This is a Philotes bug: report it with the type. Capture cannot pass this transaction; to skip it (a gap, recorded): ${resetCommand(frame.source, ' --skip-to-current')}`,
    'VALUE_UNENCODABLE',
    {
      schema,
      table,
      column,
      type: type.name,
      typeOid: type.oid,
      lsn,
      valuePrefix: text.slice(0, 60),
    },
  );
}

/**
 * A tuple as a jsonb field holding a JSON object. Returns the columns left out because their
 * value is an unchanged TOASTed one that was not sent (never reported as null, they are named
 * in unchanged_columns), and the json/jsonb columns whose value is the JSON document null.
 */
function writeJsonb(
  out: CopyBuffer,
  frame: RowFrame,
  enc: RelationEncoding,
  tuple: TupleView,
  keyOnly: boolean,
  fallback: TupleView | null,
): { unchanged: string[] | null; jsonNulls: string[] | null } {
  const columns = enc.relation.columns;
  const n = tuple.count;
  if (n > columns.length)
    throw new Error(`pgoutput: tuple has more columns than relation ${enc.relation.table}`);
  const field = out.openField();
  out.byte(JSONB_VERSION);
  let unchanged: number[] | null = null;
  /** [column, name or element path] of json values that are the JSON document null. */
  let jsonNulls: Array<[number, string]> | null = null;
  let first = true;
  out.byte(0x7b); // {
  const order = enc.order;
  for (let k = 0; k < order.length; k++) {
    const i = order[k]!;
    if (i >= n) continue; // a tuple shorter than its relation
    const column = columns[i]!;
    if (keyOnly && !column.key) continue;
    let source = tuple;
    if (source.isUnchanged(i) && fallback !== null && i < fallback.count) source = fallback;
    if (source.isUnchanged(i)) {
      (unchanged ??= []).push(i);
      continue;
    }
    if (!first) out.byte(0x2c); // ,
    first = false;
    out.bytes(enc.keys[i]!);
    if (source.isNull(i)) out.bytes(NULL_JSON);
    else {
      try {
        if (column.type.kind === 'json') {
          if (isJsonNull(source, i)) (jsonNulls ??= []).push([i, column.name]);
        } else if (column.type.kind === 'array' && column.type.element?.kind === 'json') {
          for (const path of jsonNullElements(source.text(i), column.type))
            (jsonNulls ??= []).push([i, `${column.name}${path}`]);
        }
        writeJson(out, source, i, column.type);
      } catch (error) {
        throw unencodableError(frame, enc, column.name, column.type, source.text(i), error);
      }
    }
  }
  out.byte(0x7d); // }
  out.closeField(field);
  // Named in column order, whatever order the keys went in.
  const names = (list: number[] | null) =>
    list && list.sort((a, b) => a - b).map((i) => columns[i]!.name);
  return {
    unchanged: names(unchanged),
    jsonNulls: jsonNulls && jsonNulls.sort((a, b) => a[0] - b[0]).map(([, name]) => name),
  };
}

/** The value is the JSON document null (json keeps the whitespace around it as written). */
function isJsonNull(tuple: TupleView, i: number): boolean {
  const src = tuple.buf;
  let start = tuple.starts[i]!;
  let end = tuple.ends[i]!;
  while (start < end && isJsonSpace(src[start]!)) start++;
  while (end > start && isJsonSpace(src[end - 1]!)) end--;
  return (
    end - start === 4 &&
    src[start] === 0x6e &&
    src[start + 1] === 0x75 &&
    src[start + 2] === 0x6c &&
    src[start + 3] === 0x6c
  );
}

function isJsonSpace(b: number): boolean {
  return b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;
}

export function sameShape(a: ResolvedRelation, b: ResolvedRelation): boolean {
  if (a.schema !== b.schema || a.table !== b.table || a.columns.length !== b.columns.length)
    return false;
  if (a.primaryKey.join('\0') !== b.primaryKey.join('\0')) return false;
  return a.columns.every((c, i) => {
    const d = b.columns[i];
    return (
      d !== undefined &&
      c.name === d.name &&
      c.type.oid === d.type.oid &&
      c.typeMod === d.typeMod &&
      c.key === d.key
    );
  });
}
