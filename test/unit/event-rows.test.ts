import { ChunkRows } from '../../workers/snapshot/chunk-rows.js';
import { describe, expect, it } from 'vitest';
import { formatLsn } from '../../src/common/lsn.js';
import {
  COPY_BINARY_HEADER,
  COPY_BINARY_TRAILER,
  EVENT_COPY_COLUMNS,
} from '../../src/common/buffer-format.js';
import {
  BatchBuilder,
  pgTimeToMs,
  type ResolvedRelation,
  type TakenBatch,
} from '../../workers/decode/event-rows.js';
import { PG_EPOCH_OFFSET_US } from '../../workers/decode/pgoutput.js';
import { tupleView as T, UNCHANGED } from '../support/pgoutput.js';
import { BUILTIN_TYPES, type TypeInfo } from '../../workers/decode/values.js';

function builtin(oid: number): TypeInfo {
  const t = BUILTIN_TYPES.get(oid);
  if (!t) throw new Error(`no type ${oid}`);
  return t;
}

/** µs since 2000-01-01 for an ISO instant plus extra microseconds. */
function pgTime(iso: string, extraMicros = 0): number {
  return Date.parse(iso) * 1000 + extraMicros - EPOCH;
}

const EPOCH = Number(PG_EPOCH_OFFSET_US);

const ORDERS_OID = 16_384;
const ORDERS: ResolvedRelation = {
  oid: ORDERS_OID,
  schema: 'shop',
  table: 'orders',
  columns: [
    { name: 'id', type: builtin(20), typeMod: -1, key: true },
    { name: 'note', type: builtin(25), typeMod: -1, key: false },
    { name: 'doc', type: builtin(114), typeMod: -1, key: false }, // json: spliced verbatim
    { name: 'amount', type: builtin(1700), typeMod: (12 << 16) + 2 + 4, key: false },
    { name: 'tags', type: builtin(1009), typeMod: -1, key: false },
  ],
  primaryKey: ['id'],
};

type Row = Record<(typeof EVENT_COPY_COLUMNS)[number], string | null>;

/** A text[] as PostgreSQL would print it with every element quoted. */
function textArrayLiteral(items: readonly string[]): string {
  return `{${items.map((s) => `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`).join(',')}}`;
}

/** µs since 2000-01-01 as ISO-8601 with microseconds, exactly (BigInt, floored). */
function isoMicros(pgMicros: bigint): string {
  const unix = pgMicros + PG_EPOCH_OFFSET_US;
  const micros = ((unix % 1_000_000n) + 1_000_000n) % 1_000_000n;
  const seconds = (unix - micros) / 1_000_000n;
  const date = new Date(Number(seconds) * 1000).toISOString().slice(0, 19);
  return `${date}.${String(micros).padStart(6, '0')}Z`;
}

/**
 * The batch's binary COPY rows, read back the way PostgreSQL's receive functions read them, and
 * rendered as text: LSNs as 'X/Y', timestamps as ISO, text[] as literals, jsonb as its JSON.
 * Also checks that the rows are well formed: PostgreSQL would reject them otherwise.
 */
function rows(batch: TakenBatch, data: ArrayBuffer = batch.data): Row[] {
  expect(data).toBeInstanceOf(ArrayBuffer);
  const buf = Buffer.from(data);
  const out: Row[] = [];
  let p = 0;
  const text = (start: number, end: number) =>
    new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(start, end));
  while (p < buf.length) {
    expect(buf.readInt16BE(p)).toBe(EVENT_COPY_COLUMNS.length);
    p += 2;
    const row = {} as Row;
    for (const column of EVENT_COPY_COLUMNS) {
      const len = buf.readInt32BE(p);
      p += 4;
      if (len === -1) {
        row[column] = null;
        continue;
      }
      const start = p;
      const end = p + len;
      expect(end).toBeLessThanOrEqual(buf.length);
      switch (column) {
        case 'lsn':
          expect(len).toBe(8);
          row[column] = formatLsn(buf.readBigUInt64BE(start));
          break;
        case 'xid':
          expect(len).toBe(8);
          row[column] = String(buf.readBigInt64BE(start));
          break;
        case 'seq':
          expect(len).toBe(4);
          row[column] = String(buf.readInt32BE(start));
          break;
        case 'committed_at':
          expect(len).toBe(8);
          row[column] = isoMicros(buf.readBigInt64BE(start));
          break;
        case 'before':
        case 'after':
        case 'details':
          expect(buf[start]).toBe(1); // jsonb's version byte
          row[column] = text(start + 1, end);
          JSON.parse(row[column]); // valid JSON, or the buffer would refuse it
          break;
        case 'primary_key':
        case 'unchanged_columns': {
          const dims = buf.readInt32BE(start);
          expect(buf.readInt32BE(start + 4)).toBe(0); // no NULLs
          expect(buf.readInt32BE(start + 8)).toBe(25); // text
          const items: string[] = [];
          let q = start + 12;
          if (dims === 1) {
            const n = buf.readInt32BE(q);
            expect(buf.readInt32BE(q + 4)).toBe(1); // lower bound
            q += 8;
            for (let i = 0; i < n; i++) {
              const itemLen = buf.readInt32BE(q);
              items.push(text(q + 4, q + 4 + itemLen));
              q += 4 + itemLen;
            }
          } else {
            expect(dims).toBe(0);
          }
          expect(q).toBe(end);
          row[column] = textArrayLiteral(items);
          break;
        }
        default:
          row[column] = text(start, end);
      }
      p = end;
    }
    out.push(row);
  }
  return out;
}

const json = (text: string | null): unknown => (text === null ? null : JSON.parse(text));

/** A protocol DataRow body: Int16 count, then per column Int32 length (-1: NULL) and bytes. */
function dataRow(values: ReadonlyArray<string | null>): Buffer {
  const parts: Buffer[] = [Buffer.from([values.length >> 8, values.length & 0xff])];
  for (const v of values) {
    const len = Buffer.alloc(4);
    len.writeInt32BE(v === null ? -1 : Buffer.byteLength(v));
    parts.push(len);
    if (v !== null) parts.push(Buffer.from(v));
  }
  return Buffer.concat(parts);
}

describe('pgTimeToMs', () => {
  it('gives Unix milliseconds, floored', () => {
    expect(pgTimeToMs(pgTime('2026-11-25T00:50:18.120Z', 345))).toBe(
      Date.parse('2026-11-25T00:50:18.120Z'),
    );
    expect(pgTimeToMs(-EPOCH - 1500)).toBe(-2);
  });
});

describe('binary COPY framing', () => {
  it('header and trailer are what PostgreSQL expects', () => {
    expect(COPY_BINARY_HEADER.subarray(0, 11).toString('latin1')).toBe('PGCOPY\n\xff\r\n\0');
    expect(COPY_BINARY_HEADER.length).toBe(19);
    expect(COPY_BINARY_TRAILER.readInt16BE(0)).toBe(-1);
  });
});

describe('BatchBuilder', () => {
  const FINAL_LSN = 2 ** 32 + 0x16b3748; // 1/16B3748: a non-zero high word
  const END_LSN = 2 ** 32 + 0x16b3790;
  const COMMIT_TIME = pgTime('2026-11-25T00:50:18.120Z', 345);
  const XID = 771;

  it('encodes a whole transaction as COPY rows, field by field', () => {
    const b = new BatchBuilder('shop-eu');
    expect(b.hasContent).toBe(false);
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    expect(b.isInTransaction).toBe(true);
    b.relation(ORDERS);

    // INSERT: a tab in text, raw newline and tab inside json (spliced verbatim), a text[].
    b.insert(
      ORDERS_OID,
      T(['1', 'tab\there\\', '{"n":\n\t12345678901234567890}', '12.50', '{a,"b c"}']),
    );
    // UPDATE with the key changed ('K': key columns only) and an unchanged TOASTed doc.
    b.update(
      ORDERS_OID,
      'K',
      T(['1', 'ignored', null, null, null]),
      T(['2', 'new', UNCHANGED, '13.00', '{}']),
    );
    // UPDATE with REPLICA IDENTITY FULL ('O'): the old value fills in the unchanged doc.
    b.update(
      ORDERS_OID,
      'O',
      T(['2', 'new', '{"kept": true}', '13.00', '{}']),
      T(['2', 'newer', UNCHANGED, '14.00', '{x}']),
    );
    // UPDATE without an old tuple, doc unchanged.
    b.update(ORDERS_OID, null, null, T(['2', 'newest', UNCHANGED, '15.00', '{NULL}']));
    // DELETE with a 'K' tuple: only key columns in before, even if others carry values.
    b.delete(ORDERS_OID, 'K', T(['2', 'not part of the key', null, null, null]));
    b.truncate([ORDERS_OID], true, false);
    b.commit(END_LSN, COMMIT_TIME);
    expect(b.isInTransaction).toBe(false);
    expect(b.rows).toBe(6);
    expect(b.bytes).toBeGreaterThan(0);
    expect(b.hasContent).toBe(true);

    const batch = b.take();
    expect(batch.rows).toBe(6);
    expect(batch.counts).toEqual({
      insert: 1,
      update: 3,
      delete: 1,
      truncate: 1,
      message: 0,
      ddl: 0,
      snapshot: 0,
    });
    expect(batch.transactions).toBe(1);
    expect(batch.checkpointLsn).toBe('1/16B3790'); // the commit's end LSN
    expect(batch.checkpointLsn).toBe(formatLsn(BigInt(END_LSN)));
    expect(batch.checkpointXid).toBe(XID);
    expect(batch.checkpointCommitTimeMs).toBe(Date.parse('2026-11-25T00:50:18.120Z'));

    const [ins, updK, updO, updNone, del, trunc] = rows(batch);
    for (const [i, row] of [ins, updK, updO, updNone, del, trunc].entries()) {
      expect(row).toMatchObject({
        source_id: 'shop-eu',
        lsn: '1/16B3748', // the transaction's commit LSN (Begin's final LSN)
        seq: String(i + 1),
        xid: '771',
        committed_at: '2026-11-25T00:50:18.120345Z',
        schema_name: 'shop',
        table_name: 'orders',
        primary_key: '{"id"}',
      });
    }

    expect(ins!.operation).toBe('INSERT');
    expect(ins!.before).toBeNull();
    // json spliced verbatim: its raw newline and tab survive. Keys come in jsonb's own order
    // (shorter first, then bytewise), which spares the buffer a sort.
    expect(ins!.after).toBe(
      '{"id":"1","doc":{"n":\n\t12345678901234567890},"note":"tab\\there\\\\","tags":["a","b c"],"amount":"12.50"}',
    );
    expect(json(ins!.after)).toEqual({
      id: '1',
      note: 'tab\there\\',
      doc: { n: expect.any(Number) }, // the exact digits are checked on the text above
      amount: '12.50',
      tags: ['a', 'b c'],
    });
    expect(ins!.unchanged_columns).toBeNull();

    expect(updK!.operation).toBe('UPDATE');
    expect(json(updK!.before)).toEqual({ id: '1' });
    expect(json(updK!.after)).toEqual({ id: '2', note: 'new', amount: '13.00', tags: [] });
    expect(updK!.after).not.toContain('"doc"'); // never reported as null
    expect(updK!.unchanged_columns).toBe('{"doc"}');

    expect(json(updO!.before)).toEqual({
      id: '2',
      note: 'new',
      doc: { kept: true },
      amount: '13.00',
      tags: [],
    });
    expect(json(updO!.after)).toEqual({
      id: '2',
      note: 'newer',
      doc: { kept: true },
      amount: '14.00',
      tags: ['x'],
    });
    expect(updO!.unchanged_columns).toBeNull();

    expect(updNone!.before).toBeNull();
    expect(json(updNone!.after)).toEqual({
      id: '2',
      note: 'newest',
      amount: '15.00',
      tags: [null],
    });
    expect(updNone!.unchanged_columns).toBe('{"doc"}');

    expect(del!.operation).toBe('DELETE');
    expect(json(del!.before)).toEqual({ id: '2' });
    expect(del!.after).toBeNull();
    expect(del!.unchanged_columns).toBeNull();

    expect(trunc).toMatchObject({ operation: 'TRUNCATE', before: null, after: null });
    expect(trunc!.unchanged_columns).toBeNull();
    expect(json(trunc!.details)).toEqual({
      cascade: true,
      restart_identity: false,
      tables: ['shop.orders'],
    });
    expect(del!.details).toBeNull();

    // Taking empties the builder.
    expect(b.rows).toBe(0);
    expect(b.hasContent).toBe(false);
    const empty = b.take();
    expect(empty.rows).toBe(0);
    expect(empty.data.byteLength).toBe(0);
    expect(empty.checkpointLsn).toBeNull();
  });

  it('a source id and names with tabs, newlines, quotes and backslashes come through exactly', () => {
    const b = new BatchBuilder('a\\b');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation({
      oid: 1,
      schema: 'we\tird',
      table: 'new\nline',
      columns: [{ name: 'k"ey\\', type: builtin(23), typeMod: -1, key: true }],
      primaryKey: ['k"ey\\'],
    });
    b.insert(1, T(['7']));
    b.commit(END_LSN, COMMIT_TIME);
    const [row] = rows(b.take());
    expect(row).toMatchObject({
      source_id: 'a\\b',
      schema_name: 'we\tird',
      table_name: 'new\nline',
      primary_key: '{"k\\"ey\\\\"}',
    });
    expect(json(row!.after)).toEqual({ 'k"ey\\': 7 });
  });

  it('a streamed transaction: staged rows by (sub)transaction, an aborted subtransaction, the commit', () => {
    const b = new BatchBuilder('s');
    const TOP = 900;
    b.streamStart(TOP);
    b.relation(ORDERS); // the stream's own relation
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    b.insert(ORDERS_OID, T(['2', null, null, '2', '{}']));
    b.streamChange(901);
    b.insert(ORDERS_OID, T(['3', null, null, '3', '{}']));
    b.streamStop();
    expect(b.isInTransaction).toBe(false);
    expect(b.hasOpenStreams).toBe(true);
    const first = b.take();
    expect([first.rows, first.stagedRows, first.data.byteLength]).toEqual([0, 3, 0]);
    expect(first.checkpointLsn).toBeNull();
    expect(first.schemaChanges).toEqual([]); // recorded at the commit
    expect(first.streamOps).toEqual([]);
    const staged = rows(first, first.staged!);
    // The lsn field carries the top xid (cdc_staged.top_xid), xid the subtransaction.
    expect(staged.map((r) => [r.lsn, r.seq, r.xid])).toEqual([
      [formatLsn(BigInt(TOP)), '1', '900'],
      [formatLsn(BigInt(TOP)), '2', '900'],
      [formatLsn(BigInt(TOP)), '3', '901'],
    ]);

    // A later block: seq runs on; its subtransaction aborts; then the commit.
    b.streamStart(TOP);
    b.streamChange(902);
    b.insert(ORDERS_OID, T(['4', null, null, '4', '{}']));
    b.streamStop();
    b.streamAbort(TOP, 902);
    b.streamCommit(TOP, FINAL_LSN, END_LSN, COMMIT_TIME);
    const second = b.take();
    expect(rows(second, second.staged!).map((r) => [r.seq, r.xid])).toEqual([['4', '902']]);
    expect(second.streamOps).toEqual([
      { op: 'abort', xid: TOP, subXid: 902 },
      { op: 'commit', xid: TOP, lsn: formatLsn(BigInt(FINAL_LSN)), committedAtUs: COMMIT_TIME },
    ]);
    expect(second.counts.insert).toBe(3); // not the aborted one
    expect(second.transactions).toBe(1);
    expect(second.checkpointLsn).toBe(formatLsn(BigInt(END_LSN)));
    expect(second.checkpointXid).toBe(TOP);
    expect(second.schemaChanges.map((c) => [c.table, c.lsn])).toEqual([
      ['orders', formatLsn(BigInt(FINAL_LSN))],
    ]);
    expect(b.hasOpenStreams).toBe(false);

    // pgoutput does not send a committed stream's relations again: they are everyone's now.
    b.begin(FINAL_LSN + 1000, COMMIT_TIME, XID);
    b.insert(ORDERS_OID, T(['5', null, null, '5', '{}']));
    b.commit(END_LSN + 1000, COMMIT_TIME);
    expect(rows(b.take()).map((r) => r.seq)).toEqual(['1']);
  });

  it('a shape first used by an aborted streamed subtransaction is recorded with the change that uses it next, or not at all', () => {
    const b = new BatchBuilder('s');
    const TOP = 950;
    b.streamStart(TOP);
    b.relation(ORDERS);
    b.streamChange(951);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}'])); // first use: the subtransaction's
    b.streamStop();
    b.streamAbort(TOP, 951);
    b.streamCommit(TOP, FINAL_LSN, END_LSN, COMMIT_TIME);
    expect(b.take().schemaChanges).toEqual([]); // no event of the stream uses it

    const c = new BatchBuilder('s');
    c.streamStart(TOP);
    c.relation(ORDERS);
    c.streamChange(951);
    c.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    c.streamStop();
    c.streamAbort(TOP, 951);
    c.streamStart(TOP);
    c.insert(ORDERS_OID, T(['2', null, null, '2', '{}'])); // the top transaction's own
    c.streamStop();
    c.streamCommit(TOP, FINAL_LSN, END_LSN, COMMIT_TIME);
    expect(c.take().schemaChanges.map((x) => [x.table, x.lsn])).toEqual([
      ['orders', formatLsn(BigInt(FINAL_LSN))],
    ]);
  });

  it('snapshot rows: SNAPSHOT events with after only, encoded as the stream encodes them', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', 'x', '{"a": 1}', '2.500', '{a,b}']));
    // As the server sends a query's rows (DataRow bodies); the one in the middle is left out.
    const chunk = new ChunkRows();
    for (const values of [
      ['1', 'x', '{"a": 1}', '2.500', '{a,b}'],
      ['9', 'dropped', null, null, null],
      ['2', null, null, null, null],
    ])
      chunk.add(dataRow(values));
    b.snapshotRows(ORDERS_OID, chunk, [0, 2], null);
    // Rows read before the table changed shape: columns found by name (here in reverse order).
    const reversed = new ChunkRows();
    reversed.add(dataRow(['{c}', '7.000', null, 'y', '3']));
    b.snapshotRows(ORDERS_OID, reversed, [0], [4, 3, 2, 1, 0]);
    b.commit(END_LSN, COMMIT_TIME);
    const batch = b.take();
    const r = rows(batch);
    expect(r.map((x) => [x.seq, x.operation, x.before])).toEqual([
      ['1', 'INSERT', null],
      ['2', 'SNAPSHOT', null],
      ['3', 'SNAPSHOT', null],
      ['4', 'SNAPSHOT', null],
    ]);
    // The same values give the same after as the stream's INSERT.
    expect(r[1]!.after).toBe(r[0]!.after);
    expect(JSON.parse(r[2]!.after!)).toMatchObject({ id: '2', note: null });
    expect(JSON.parse(r[3]!.after!)).toMatchObject({ id: '3', note: 'y', tags: ['c'] });
    expect(batch.counts.snapshot).toBe(3);
  });

  it("an aborted streamed transaction's relations are forgotten", () => {
    const b = new BatchBuilder('s');
    b.streamStart(7);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    b.streamStop();
    b.streamAbort(7, 7);
    const batch = b.take();
    expect(batch.streamOps).toEqual([{ op: 'abort', xid: 7, subXid: null }]);
    expect(batch.counts.insert).toBe(0);
    expect(batch.checkpointLsn).toBeNull();
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    expect(() => b.insert(ORDERS_OID, T(['2', null, null, '2', '{}']))).toThrow(
      'change for unknown relation',
    );
  });

  it('a transaction split across two take() calls keeps its seq numbering', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    b.insert(ORDERS_OID, T(['2', null, null, '2', '{}']));

    const first = b.take();
    expect(first.rows).toBe(2);
    expect(first.checkpointLsn).toBeNull(); // nothing committed yet
    expect(first.transactions).toBe(0);
    expect(first.schemaChanges).toHaveLength(1);
    expect(rows(first).map((r) => r.seq)).toEqual(['1', '2']);
    expect(b.isInTransaction).toBe(true);

    b.insert(ORDERS_OID, T(['3', null, null, '3', '{}']));
    b.delete(ORDERS_OID, 'K', T(['1', null, null, null, null]));
    b.commit(END_LSN, COMMIT_TIME);
    const second = b.take();
    expect(second.rows).toBe(2);
    expect(second.checkpointLsn).toBe(formatLsn(BigInt(END_LSN)));
    expect(second.transactions).toBe(1);
    expect(second.schemaChanges).toHaveLength(0);
    expect(second.counts).toEqual({
      insert: 1,
      update: 0,
      delete: 1,
      truncate: 0,
      message: 0,
      ddl: 0,
      snapshot: 0,
    });
    const r = rows(second);
    expect(r.map((x) => x.seq)).toEqual(['3', '4']);
    expect(r.map((x) => x.lsn)).toEqual(['1/16B3748', '1/16B3748']);
  });

  // The commit of a transaction whose events all went out in an earlier batch arrives into an
  // empty builder. It must still be sent: until the buffer's checkpoint passes it, a restart
  // deletes those events as an incomplete transaction, while an idle reader would already have
  // confirmed the source past it. (Found by the schema-history and observability tests once
  // batches went out as soon as the reader caught up.)
  it('the commit of a transaction whose events went out earlier is content of its own', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    expect(b.take().rows).toBe(1);
    expect(b.hasContent).toBe(false); // still in the transaction: nothing to store yet
    b.commit(END_LSN, COMMIT_TIME);
    expect(b.rows).toBe(0);
    expect(b.hasContent).toBe(true);
    const commitOnly = b.take();
    expect(commitOnly.rows).toBe(0);
    expect(commitOnly.checkpointLsn).toBe(formatLsn(BigInt(END_LSN)));
    expect(commitOnly.transactions).toBe(1);
    expect(b.hasContent).toBe(false);
  });

  it('several transactions in one batch: seq restarts, the checkpoint is the last commit', () => {
    const b = new BatchBuilder('s');
    b.begin(0x100, COMMIT_TIME, 10);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    b.commit(0x180, COMMIT_TIME);
    b.begin(0x200, COMMIT_TIME + 1, 11);
    b.insert(ORDERS_OID, T(['2', null, null, '2', '{}']));
    b.insert(ORDERS_OID, T(['3', null, null, '3', '{}']));
    b.commit(0x280, COMMIT_TIME + 1);
    const batch = b.take();
    expect(batch.transactions).toBe(2);
    expect(batch.checkpointLsn).toBe('0/280');
    expect(batch.checkpointXid).toBe(11);
    expect(rows(batch).map((r) => [r.lsn, r.seq, r.xid])).toEqual([
      ['0/100', '1', '10'],
      ['0/200', '1', '11'],
      ['0/200', '2', '11'],
    ]);
  });

  it('a transaction without changes is nothing to send, but its checkpoint rides with the next batch', () => {
    const b = new BatchBuilder('s');
    b.begin(0x100, COMMIT_TIME, 10);
    b.commit(0x180, COMMIT_TIME);
    expect(b.rows).toBe(0);
    expect(b.hasContent).toBe(false);
    const empty = b.take();
    expect(empty.rows).toBe(0);
    expect(empty.checkpointLsn).toBe('0/180');
  });

  it('records a schema version only when the shape changes, with the first change that uses it', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    b.relation({ ...ORDERS }); // sent again, same shape
    b.insert(ORDERS_OID, T(['2', null, null, '1', '{}']));
    b.relation({
      ...ORDERS,
      columns: [...ORDERS.columns, { name: 'extra', type: builtin(16), typeMod: -1, key: false }],
    });
    b.insert(ORDERS_OID, T(['3', null, null, '1', '{}', 't']));
    const [v1, v2, ...rest] = b.take().schemaChanges;
    expect(rest).toHaveLength(0);
    expect(v1).toEqual({
      schema: 'shop',
      table: 'orders',
      columns: [
        { name: 'id', type: 'int8', typeOid: 20, typeMod: -1, key: true },
        { name: 'note', type: 'text', typeOid: 25, typeMod: -1, key: false },
        { name: 'doc', type: 'json', typeOid: 114, typeMod: -1, key: false },
        { name: 'amount', type: 'numeric', typeOid: 1700, typeMod: (12 << 16) + 6, key: false },
        { name: 'tags', type: '_text', typeOid: 1009, typeMod: -1, key: false },
      ],
      primaryKey: ['id'],
      lsn: '1/16B3748',
    });
    expect(v2?.columns.map((c) => c.name)).toEqual([
      'id',
      'note',
      'doc',
      'amount',
      'tags',
      'extra',
    ]);
  });

  it('names json columns holding the JSON document null in details, apart from SQL NULL', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', null, ' null ', '1', '{}'])); // json keeps its whitespace
    b.insert(ORDERS_OID, T(['2', null, null, '1', '{}'])); // SQL NULL
    b.update(ORDERS_OID, 'O', T(['1', null, 'null', '1', '{}']), T(['1', null, '{}', '1', '{}']));
    const [jsonNull, sqlNull, update] = rows(b.take());
    expect(json(jsonNull!.after)).toMatchObject({ doc: null });
    expect(json(jsonNull!.details)).toEqual({ json_null: { after: ['doc'] } });
    expect(json(sqlNull!.after)).toMatchObject({ doc: null });
    expect(sqlNull!.details).toBeNull();
    expect(json(update!.details)).toEqual({ json_null: { before: ['doc'] } });
  });

  it('records no version for a relation no change uses (a partition published as its root)', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation({ ...ORDERS, oid: 99, table: 'orders_2026' }); // the partition's own Relation
    b.relation(ORDERS); // the root's, which the changes use
    b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']));
    expect(b.take().schemaChanges.map((c) => c.table)).toEqual(['orders']);
  });

  it('names unchanged columns in column order, whatever order the keys go in', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation({
      oid: 2,
      schema: 'public',
      table: 'docs',
      columns: [
        { name: 'id', type: builtin(23), typeMod: -1, key: true },
        { name: 'long_body', type: builtin(25), typeMod: -1, key: false },
        { name: 'ab', type: builtin(25), typeMod: -1, key: false },
        { name: 'b', type: builtin(25), typeMod: -1, key: false },
      ],
      primaryKey: ['id'],
    });
    b.update(2, null, null, T(['1', UNCHANGED, UNCHANGED, 'x']));
    b.commit(END_LSN, COMMIT_TIME);
    const [row] = rows(b.take());
    expect(row!.after).toBe('{"b":"x","id":1}');
    expect(row!.unchanged_columns).toBe('{"long_body","ab"}');
  });

  it('hands over a transferable ArrayBuffer', () => {
    const b = new BatchBuilder('s');
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', 'é 🐘', null, '1', '{}']));
    b.commit(END_LSN, COMMIT_TIME);
    const batch = b.take();
    const moved = structuredClone(batch.data, { transfer: [batch.data] });
    expect(batch.data.byteLength).toBe(0); // detached: it really moved
    expect(new TextDecoder().decode(moved)).toContain('"note":"é 🐘"');
  });

  it('refuses changes for an unknown relation or outside a transaction', () => {
    const b = new BatchBuilder('s');
    b.relation(ORDERS);
    expect(() => b.insert(ORDERS_OID, T(['1', null, null, '1', '{}']))).toThrow(
      'pgoutput: change outside a transaction',
    );
    b.begin(FINAL_LSN, COMMIT_TIME, XID);
    expect(() => b.insert(999, T(['1']))).toThrow('pgoutput: change for unknown relation 999');
    expect(() => b.insert(ORDERS_OID, T(['1', null, null, '1', '{}', 'one too many']))).toThrow(
      /more columns than relation/,
    );
  });
});

describe('a value the encoder has no form for', () => {
  it('stops the source as VALUE_UNENCODABLE, naming table, column, type and LSN, and leaves no half row', () => {
    const b = new BatchBuilder('shop-eu');
    b.begin(2 ** 32 + 0x6b3748, 0, 771);
    b.relation(ORDERS);
    b.insert(ORDERS_OID, T(['1', 'fine', null, '1.00', '{a}']));
    // A text[] whose text is not an array literal: only a bug of ours could make one.
    let thrown: unknown;
    try {
      b.insert(ORDERS_OID, T(['2', 'x', null, '1.00', '1 2 3']));
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toMatchObject({
      name: 'FatalSourceError',
      code: 'VALUE_UNENCODABLE',
      details: { schema: 'shop', table: 'orders', column: 'tags', type: '_text', lsn: '1/6B3748' },
    });
    expect((thrown as Error).message).toContain('shop.orders');
    b.commit(2 ** 32 + 0x6b3800, 0);
    const batch = b.take();
    expect(rows(batch).map((r) => JSON.parse(r.after!).id)).toEqual(['1']);
  });
});

describe('a transaction with more changes than seq can number', () => {
  it('stops the source as TRANSACTION_TOO_LARGE instead of wrapping seq', () => {
    const b = new BatchBuilder('shop-eu');
    b.begin(2 ** 32 + 0x6b3748, 0, 771);
    b.relation(ORDERS);
    // 2^31 - 1 changes already numbered (cheaper than making them): the next has no seq.
    (b as unknown as { txSeq: number }).txSeq = 2 ** 31 - 1;
    expect(() => b.insert(ORDERS_OID, T(['1', 'x', null, '1.00', '{a}']))).toThrow(
      expect.objectContaining({
        code: 'TRANSACTION_TOO_LARGE',
        details: expect.objectContaining({ lsn: '1/6B3748' }),
      }),
    );
  });
});
