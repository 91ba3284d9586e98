/**
 * pgoutput messages for tests: a writer that builds them byte by byte (after
 * https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html, protocol 1),
 * and a reader that runs them through the reader thread's own decoder and hands back plain
 * objects (tuple values as text, null, or UNCHANGED; LSNs and times as BigInt).
 */
import {
  PgoutputDecoder,
  TupleView,
  type PgoutputHandler,
  type PgoutputMessage,
} from '../../workers/decode/pgoutput.js';

/** A column value in a tuple: its text, SQL NULL, or "unchanged TOASTed value, not sent". */
export const UNCHANGED = Symbol('unchanged-toast');
export type TupleValue = string | null | typeof UNCHANGED;

/** Big-endian message writer with the protocol's field types. */
export class Msg {
  private readonly parts: Buffer[] = [];

  constructor(tag: string) {
    this.byte(tag);
  }
  byte(c: string): this {
    return this.int8(c.charCodeAt(0));
  }
  int8(n: number): this {
    const b = Buffer.alloc(1);
    b.writeUInt8(n);
    this.parts.push(b);
    return this;
  }
  int16(n: number): this {
    const b = Buffer.alloc(2);
    b.writeInt16BE(n);
    this.parts.push(b);
    return this;
  }
  int32(n: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32BE(n);
    this.parts.push(b);
    return this;
  }
  uint32(n: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    this.parts.push(b);
    return this;
  }
  int64(n: bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigInt64BE(n);
    this.parts.push(b);
    return this;
  }
  uint64(n: bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(n);
    this.parts.push(b);
    return this;
  }
  string(s: string): this {
    this.parts.push(Buffer.from(s, 'utf8'), Buffer.from([0]));
    return this;
  }
  raw(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  /** TupleData: Int16 column count, then 'n' | 'u' | 't' Int32 length + bytes per column. */
  tuple(values: TupleValue[]): this {
    this.int16(values.length);
    for (const v of values) {
      if (v === null) this.byte('n');
      else if (v === UNCHANGED) this.byte('u');
      else {
        const bytes = Buffer.from(v, 'utf8');
        this.byte('t').int32(bytes.length).raw(bytes);
      }
    }
    return this;
  }
  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** A tuple as the decoder hands it over, from values. */
export function tupleView(values: TupleValue[]): TupleView {
  const view = new TupleView();
  view.read(new Msg('I').tuple(values).build(), 1);
  return view;
}

export function tupleValues(view: TupleView): TupleValue[] {
  return Array.from({ length: view.count }, (_, i) =>
    view.isNull(i) ? null : view.isUnchanged(i) ? UNCHANGED : view.text(i),
  );
}

export type DecodedMessage =
  | { tag: 'begin'; finalLsn: bigint; commitTime: bigint; xid: number }
  | { tag: 'commit'; commitLsn: bigint; endLsn: bigint; commitTime: bigint }
  | { tag: 'insert'; relationOid: number; after: TupleValue[] }
  | {
      tag: 'update';
      relationOid: number;
      beforeKind: 'K' | 'O' | null;
      before: TupleValue[] | null;
      after: TupleValue[];
    }
  | { tag: 'delete'; relationOid: number; beforeKind: 'K' | 'O'; before: TupleValue[] }
  | { tag: 'streamStart'; xid: number }
  | { tag: 'streamChange'; xid: number }
  | { tag: 'streamStop' }
  | { tag: 'streamCommit'; xid: number; commitLsn: bigint; endLsn: bigint; commitTime: bigint }
  | { tag: 'streamAbort'; xid: number; subXid: number }
  | PgoutputMessage;

/** Decodes one message the way the reader does, into an object. */
export function decodeMessage(buf: Buffer): DecodedMessage {
  const decoded = decodeMessages([buf]);
  if (decoded.length === 0) throw new Error('the decoder called no handler');
  return decoded[decoded.length - 1]!;
}

/** Decodes messages in order with one decoder (stream blocks span messages): every call made. */
export function decodeMessages(bufs: Buffer[]): DecodedMessage[] {
  const calls: DecodedMessage[] = [];
  let decoded: DecodedMessage | undefined;
  const handler: PgoutputHandler = {
    begin: (finalLsn, commitTime, xid) =>
      (decoded = { tag: 'begin', finalLsn: BigInt(finalLsn), commitTime: BigInt(commitTime), xid }),
    commit: (commitLsn, endLsn, commitTime) =>
      (decoded = {
        tag: 'commit',
        commitLsn: BigInt(commitLsn),
        endLsn: BigInt(endLsn),
        commitTime: BigInt(commitTime),
      }),
    insert: (relationOid, after) =>
      (decoded = { tag: 'insert', relationOid, after: tupleValues(after) }),
    update: (relationOid, beforeKind, before, after) =>
      (decoded = {
        tag: 'update',
        relationOid,
        beforeKind,
        before: before && tupleValues(before),
        after: tupleValues(after),
      }),
    delete: (relationOid, beforeKind, before) =>
      (decoded = { tag: 'delete', relationOid, beforeKind, before: tupleValues(before) }),
    other: (message) => (decoded = message),
    streamStart: (xid) => (decoded = { tag: 'streamStart', xid }),
    streamChange: (xid) => calls.push({ tag: 'streamChange', xid }),
    streamStop: () => (decoded = { tag: 'streamStop' }),
    streamCommit: (xid, commitLsn, endLsn, commitTime) =>
      (decoded = {
        tag: 'streamCommit',
        xid,
        commitLsn: BigInt(commitLsn),
        endLsn: BigInt(endLsn),
        commitTime: BigInt(commitTime),
      }),
    streamAbort: (xid, subXid) => (decoded = { tag: 'streamAbort', xid, subXid }),
  };
  const decoder = new PgoutputDecoder();
  for (const buf of bufs) {
    decoded = undefined;
    decoder.decode(buf, 0, handler);
    if (decoded) calls.push(decoded);
  }
  return calls;
}
