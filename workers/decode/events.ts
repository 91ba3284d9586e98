/**
 * Turns decoded pgoutput changes into rows of cdc_events in COPY text format, accumulated into
 * one batch at a time. Building COPY text here, in the reader thread, means the supervisor never
 * parses or re-serializes an event: it streams the bytes it is handed into the buffer.
 */
import type { ColumnInfo, OperationCounts, SchemaChange } from '../../src/protocol.js';
import { formatLsn } from '../../src/lsn.js';
import { PG_EPOCH_OFFSET_US, UNCHANGED, type TupleValue } from './pgoutput.js';
import { mayNeedCopyEscape, toJson, type TypeInfo } from './values.js';

/** Column order of the COPY into cdc_events; the buffer writer uses the same list. */
export const EVENT_COPY_COLUMNS = [
  'source_id',
  'lsn',
  'seq',
  'xid',
  'committed_at',
  'schema_name',
  'table_name',
  'operation',
  'before',
  'after',
  'primary_key',
  'unchanged_columns',
] as const;

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

interface RelationEncoding {
  readonly relation: ResolvedRelation;
  /** '"name":' for each column, computed once. */
  readonly jsonKeys: readonly string[];
  /** Whether some column name needs COPY escaping (then every row of this table is escaped). */
  readonly keysNeedEscape: boolean;
  /** 'schema\ttable\t' already COPY-escaped. */
  readonly location: string;
  /** The primary_key array literal, COPY-escaped. */
  readonly primaryKey: string;
}

export interface TakenBatch {
  readonly data: ArrayBuffer;
  readonly rows: number;
  readonly counts: OperationCounts;
  readonly checkpointLsn: string | null;
  readonly checkpointXid: number | null;
  readonly checkpointCommitTimeMs: number | null;
  readonly transactions: number;
  readonly schemaChanges: SchemaChange[];
}

const COPY_SPECIAL = /[\\\n\r\t]/;

/** Escapes a value for COPY text format (tab-separated, backslash escapes). */
export function copyEscape(text: string): string {
  if (!COPY_SPECIAL.test(text)) return text;
  return text.replace(/[\\\n\r\t]/g, (c) =>
    c === '\\' ? '\\\\' : c === '\n' ? '\\n' : c === '\r' ? '\\r' : '\\t',
  );
}

/** A PostgreSQL text[] literal with every element quoted. */
export function textArrayLiteral(items: readonly string[]): string {
  return `{${items.map((s) => `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`).join(',')}}`;
}

/** PostgreSQL timestamps (µs since 2000-01-01) as ISO-8601 with microseconds. */
export function pgTimeToIso(pgMicros: bigint): string {
  // As a Number: exact for any time within ±285 years of 1970 (2^53 µs), which commit times are.
  const unixMicros = Number(pgMicros) + PG_EPOCH_OFFSET_US_NUMBER;
  // Floor, not truncation: before 1970 the remainder would be negative.
  const second = Math.floor(unixMicros / 1_000_000);
  const micros = unixMicros - second * 1_000_000;
  // Commits come many to a second: format the date and time once per second.
  if (second !== cachedSecond) {
    cachedSecond = second;
    cachedPrefix = new Date(second * 1000).toISOString().slice(0, -4); // 'YYYY-MM-DDTHH:MM:SS.'
  }
  return `${cachedPrefix}${String(micros).padStart(6, '0')}Z`;
}

const PG_EPOCH_OFFSET_US_NUMBER = Number(PG_EPOCH_OFFSET_US);
let cachedSecond = Number.NaN;
let cachedPrefix = '';

export function pgTimeToMs(pgMicros: bigint): number {
  return Math.floor((Number(pgMicros) + PG_EPOCH_OFFSET_US_NUMBER) / 1000);
}

/** A row as JSON, and whether it holds anything COPY must escape. */
interface RowJson {
  readonly json: string;
  readonly unchanged: string[] | null;
  readonly escape: boolean;
}

function copyField(row: RowJson | null): string {
  if (row === null) return '\\N';
  return row.escape ? copyEscape(row.json) : row.json;
}

export class BatchBuilder {
  private readonly relations = new Map<number, RelationEncoding>();
  private readonly sourceField: string;

  // The open transaction, if any.
  private inTransaction = false;
  private txPrefix = ''; // 'source\tlsn\t'
  private txMiddle = ''; // '\txid\tcommitted_at\t'
  private txSeq = 0;
  private txCommitLsn = '';

  // The batch being filled.
  /** The pending rows, UTF-8, written as they come: no join, no second encoding pass. */
  private buffer = Buffer.allocUnsafeSlow(1 << 20);
  private rowCount = 0;
  private byteCount = 0;
  private counts: OperationCounts = { insert: 0, update: 0, delete: 0, truncate: 0 };
  private checkpoint: { lsn: string; xid: number; commitTimeMs: number } | null = null;
  private transactions = 0;
  private schemaChanges: SchemaChange[] = [];
  private currentXid = 0;

  constructor(sourceId: string) {
    this.sourceField = copyEscape(sourceId);
  }

  get rows(): number {
    return this.rowCount;
  }

  /** UTF-8 bytes of the pending rows. */
  get bytes(): number {
    return this.byteCount;
  }

  /**
   * Whether there is anything to store: events or a schema version. A checkpoint alone is not
   * sent; it rides with the next batch. Storing it by itself would gain nothing (transactions
   * without events hold nothing to lose, and the idle confirmation already frees their WAL), and
   * when the source is the buffer database, every such store would be a new transaction to read.
   */
  get hasContent(): boolean {
    return this.rowCount > 0 || this.schemaChanges.length > 0;
  }

  get isInTransaction(): boolean {
    return this.inTransaction;
  }

  begin(finalLsn: bigint, commitTime: bigint, xid: number): void {
    this.inTransaction = true;
    this.txCommitLsn = formatLsn(finalLsn);
    this.txPrefix = `${this.sourceField}\t${this.txCommitLsn}\t`;
    this.txMiddle = `\t${xid}\t${pgTimeToIso(commitTime)}\t`;
    this.txSeq = 0;
    this.currentXid = xid;
  }

  commit(endLsn: bigint, commitTime: bigint): void {
    this.inTransaction = false;
    this.transactions++;
    this.checkpoint = {
      lsn: formatLsn(endLsn),
      xid: this.currentXid,
      commitTimeMs: pgTimeToMs(commitTime),
    };
  }

  /** Registers (or replaces) a relation; records a schema version when its shape is new. */
  relation(relation: ResolvedRelation): void {
    const previous = this.relations.get(relation.oid)?.relation;
    this.relations.set(relation.oid, {
      relation,
      jsonKeys: relation.columns.map((c) => `${JSON.stringify(c.name)}:`),
      keysNeedEscape: relation.columns.some((c) => COPY_SPECIAL.test(JSON.stringify(c.name))),
      location: `${copyEscape(relation.schema)}\t${copyEscape(relation.table)}\t`,
      primaryKey: copyEscape(textArrayLiteral(relation.primaryKey)),
    });
    if (!previous || !sameShape(previous, relation)) {
      this.schemaChanges.push({
        schema: relation.schema,
        table: relation.table,
        columns: relation.columns.map((c): ColumnInfo => ({
          name: c.name,
          type: c.type.name,
          typeOid: c.type.oid,
          typeMod: c.typeMod,
          key: c.key,
        })),
        primaryKey: [...relation.primaryKey],
        lsn: this.inTransaction ? this.txCommitLsn : '0/0',
      });
    }
  }

  hasRelation(oid: number): boolean {
    return this.relations.has(oid);
  }

  insert(relationOid: number, after: TupleValue[]): void {
    const enc = this.encoding(relationOid);
    const a = this.rowJson(enc, after, false, null);
    this.push(enc, 'INSERT', null, a, a.unchanged);
    this.counts.insert++;
  }

  update(
    relationOid: number,
    beforeKind: 'K' | 'O' | null,
    before: TupleValue[] | null,
    after: TupleValue[],
  ): void {
    const enc = this.encoding(relationOid);
    // With REPLICA IDENTITY FULL the old row carries the real value of an unchanged TOAST column.
    const b = before ? this.rowJson(enc, before, beforeKind === 'K', null) : null;
    const a = this.rowJson(enc, after, false, beforeKind === 'O' ? before : null);
    this.push(enc, 'UPDATE', b, a, a.unchanged);
    this.counts.update++;
  }

  delete(relationOid: number, beforeKind: 'K' | 'O', before: TupleValue[]): void {
    const enc = this.encoding(relationOid);
    const b = this.rowJson(enc, before, beforeKind === 'K', null);
    this.push(enc, 'DELETE', b, null, null);
    this.counts.delete++;
  }

  truncate(relationOids: number[]): void {
    for (const oid of relationOids) {
      this.push(this.encoding(oid), 'TRUNCATE', null, null, null);
      this.counts.truncate++;
    }
  }

  /** Hands over the batch as one transferable buffer and starts a new one. */
  take(): TakenBatch {
    // A copy of exactly the used bytes into a fresh ArrayBuffer, which we may transfer; the
    // working buffer stays ours for the next batch.
    const data = this.buffer.buffer.slice(
      this.buffer.byteOffset,
      this.buffer.byteOffset + this.byteCount,
    );
    const batch: TakenBatch = {
      data,
      rows: this.rowCount,
      counts: this.counts,
      checkpointLsn: this.checkpoint?.lsn ?? null,
      checkpointXid: this.checkpoint?.xid ?? null,
      checkpointCommitTimeMs: this.checkpoint?.commitTimeMs ?? null,
      transactions: this.transactions,
      schemaChanges: this.schemaChanges,
    };
    this.rowCount = 0;
    this.byteCount = 0;
    this.counts = { insert: 0, update: 0, delete: 0, truncate: 0 };
    this.checkpoint = null;
    this.transactions = 0;
    this.schemaChanges = [];
    return batch;
  }

  private encoding(oid: number): RelationEncoding {
    const enc = this.relations.get(oid);
    // pgoutput always sends a Relation message before the first change that needs it.
    if (!enc) throw new Error(`pgoutput: change for unknown relation ${oid}`);
    return enc;
  }

  private push(
    enc: RelationEncoding,
    operation: string,
    before: RowJson | null,
    after: RowJson | null,
    unchanged: string[] | null,
  ): void {
    if (!this.inTransaction) throw new Error('pgoutput: change outside a transaction');
    this.txSeq++;
    const row =
      `${this.txPrefix}${this.txSeq}${this.txMiddle}${enc.location}${operation}\t` +
      `${copyField(before)}\t${copyField(after)}\t` +
      `${enc.primaryKey}\t${unchanged && unchanged.length > 0 ? copyEscape(textArrayLiteral(unchanged)) : '\\N'}\n`;
    // A UTF-16 unit takes at most 3 UTF-8 bytes.
    const room = row.length * 3;
    if (this.byteCount + room > this.buffer.length) {
      const grown = Buffer.allocUnsafeSlow(Math.max(this.buffer.length * 2, this.byteCount + room));
      this.buffer.copy(grown, 0, 0, this.byteCount);
      this.buffer = grown;
    }
    this.byteCount += this.buffer.write(row, this.byteCount);
    this.rowCount++;
  }

  private rowJson(
    enc: RelationEncoding,
    values: TupleValue[],
    keyOnly: boolean,
    fallback: TupleValue[] | null,
  ): RowJson {
    const columns = enc.relation.columns;
    let json = '{';
    let first = true;
    let unchanged: string[] | null = null;
    let escape = enc.keysNeedEscape;
    for (let i = 0; i < values.length; i++) {
      const column = columns[i];
      if (!column)
        throw new Error(`pgoutput: tuple has more columns than relation ${enc.relation.table}`);
      if (keyOnly && !column.key) continue;
      let value = values[i];
      if (value === UNCHANGED && fallback) value = fallback[i];
      if (value === UNCHANGED || value === undefined) {
        // Never report an unchanged TOASTed value as null: leave it out and name it.
        (unchanged ??= []).push(column.name);
        continue;
      }
      let fragment = 'null';
      if (value !== null) {
        fragment = toJson(value, column.type);
        if (!escape && mayNeedCopyEscape(column.type.kind)) escape = COPY_SPECIAL.test(fragment);
      }
      json += `${first ? '' : ','}${enc.jsonKeys[i]}${fragment}`;
      first = false;
    }
    return { json: `${json}}`, unchanged, escape };
  }
}

function sameShape(a: ResolvedRelation, b: ResolvedRelation): boolean {
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
