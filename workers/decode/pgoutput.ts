/**
 * pgoutput protocol (version 1) messages, parsed from the bytes of one XLogData payload.
 * We parse ourselves rather than use pg-logical-replication's parser because that one runs every
 * value through pg's global type parsers (timestamps become Dates and lose microseconds) and
 * produces objects that cannot cross a MessagePort. Tuple values stay as the server's text.
 * Reference: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
 */

/** A column value in a tuple: its text, SQL NULL, or "unchanged TOASTed value, not sent". */
export const UNCHANGED = Symbol('unchanged-toast');
export type TupleValue = string | null | typeof UNCHANGED;

export interface RelationColumn {
  readonly flags: number; // 1 = part of the replica identity
  readonly name: string;
  readonly typeOid: number;
  readonly typeMod: number;
}

export type PgoutputMessage =
  | { tag: 'begin'; finalLsn: bigint; commitTime: bigint; xid: number }
  | { tag: 'commit'; commitLsn: bigint; endLsn: bigint; commitTime: bigint }
  | { tag: 'origin'; lsn: bigint; name: string }
  | {
      tag: 'relation';
      relationOid: number;
      schema: string;
      name: string;
      replicaIdentity: string;
      columns: RelationColumn[];
    }
  | { tag: 'type'; typeOid: number; schema: string; name: string }
  | { tag: 'insert'; relationOid: number; after: TupleValue[] }
  | {
      tag: 'update';
      relationOid: number;
      /** 'K': the old key (key columns only), 'O': the whole old row, absent: neither sent. */
      beforeKind: 'K' | 'O' | null;
      before: TupleValue[] | null;
      after: TupleValue[];
    }
  | { tag: 'delete'; relationOid: number; beforeKind: 'K' | 'O'; before: TupleValue[] }
  | { tag: 'truncate'; cascade: boolean; restartIdentity: boolean; relationOids: number[] }
  | { tag: 'message'; transactional: boolean; lsn: bigint; prefix: string; content: Buffer };

/** Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01). */
export const PG_EPOCH_OFFSET_US = 946_684_800_000_000n;

/** Node's Buffer has this method (undocumented in the types): decode without argument checks. */
interface Utf8Sliceable {
  utf8Slice(start: number, end: number): string;
}

class Reader {
  offset = 0;
  constructor(private readonly buf: Buffer) {}
  u8(): number {
    return this.buf.readUInt8(this.offset++);
  }
  i16(): number {
    const v = this.buf.readInt16BE(this.offset);
    this.offset += 2;
    return v;
  }
  i32(): number {
    const v = this.buf.readInt32BE(this.offset);
    this.offset += 4;
    return v;
  }
  u32(): number {
    const v = this.buf.readUInt32BE(this.offset);
    this.offset += 4;
    return v;
  }
  u64(): bigint {
    const v = this.buf.readBigUInt64BE(this.offset);
    this.offset += 8;
    return v;
  }
  i64(): bigint {
    const v = this.buf.readBigInt64BE(this.offset);
    this.offset += 8;
    return v;
  }
  cstring(): string {
    const end = this.buf.indexOf(0, this.offset);
    if (end < 0) throw new Error('pgoutput: unterminated string');
    const s = this.buf.toString('utf8', this.offset, end);
    this.offset = end + 1;
    return s;
  }
  bytes(n: number): Buffer {
    const b = this.buf.subarray(this.offset, this.offset + n);
    this.offset += n;
    return b;
  }
  tuple(): TupleValue[] {
    const n = this.i16();
    const values = new Array<TupleValue>(n);
    for (let i = 0; i < n; i++) {
      const kind = this.u8();
      switch (kind) {
        case 0x6e: // 'n'
          values[i] = null;
          break;
        case 0x75: // 'u'
          values[i] = UNCHANGED;
          break;
        case 0x74: {
          // 't'
          const len = this.i32();
          // utf8Slice is what toString('utf8', …) calls after checking its arguments; on the
          // hot path (every value of every row) the wrapper cost as much as the decoding.
          values[i] = (this.buf as unknown as Utf8Sliceable).utf8Slice(
            this.offset,
            this.offset + len,
          );
          this.offset += len;
          break;
        }
        default:
          // 'b' (binary) is only sent when asked for; we never ask.
          throw new Error(`pgoutput: unexpected tuple value kind 0x${kind.toString(16)}`);
      }
    }
    return values;
  }
}

export function parsePgoutput(buf: Buffer): PgoutputMessage {
  const r = new Reader(buf);
  const tag = r.u8();
  switch (tag) {
    case 0x42: // 'B'
      return { tag: 'begin', finalLsn: r.u64(), commitTime: r.i64(), xid: r.u32() };
    case 0x43: {
      // 'C'
      r.u8(); // flags, unused
      return { tag: 'commit', commitLsn: r.u64(), endLsn: r.u64(), commitTime: r.i64() };
    }
    case 0x4f: // 'O'
      return { tag: 'origin', lsn: r.u64(), name: r.cstring() };
    case 0x52: {
      // 'R'
      const relationOid = r.u32();
      const schema = r.cstring();
      const name = r.cstring();
      const replicaIdentity = String.fromCharCode(r.u8());
      const n = r.i16();
      const columns: RelationColumn[] = [];
      for (let i = 0; i < n; i++) {
        columns.push({ flags: r.u8(), name: r.cstring(), typeOid: r.u32(), typeMod: r.i32() });
      }
      return { tag: 'relation', relationOid, schema, name, replicaIdentity, columns };
    }
    case 0x59: // 'Y'
      return { tag: 'type', typeOid: r.u32(), schema: r.cstring(), name: r.cstring() };
    case 0x49: {
      // 'I'
      const relationOid = r.u32();
      r.u8(); // 'N'
      return { tag: 'insert', relationOid, after: r.tuple() };
    }
    case 0x55: {
      // 'U'
      const relationOid = r.u32();
      const kind = r.u8();
      let beforeKind: 'K' | 'O' | null = null;
      let before: TupleValue[] | null = null;
      if (kind === 0x4b || kind === 0x4f) {
        beforeKind = kind === 0x4b ? 'K' : 'O';
        before = r.tuple();
        r.u8(); // 'N' introduces the new tuple
      }
      return { tag: 'update', relationOid, beforeKind, before, after: r.tuple() };
    }
    case 0x44: {
      // 'D'
      const relationOid = r.u32();
      const beforeKind = r.u8() === 0x4b ? 'K' : 'O';
      return { tag: 'delete', relationOid, beforeKind, before: r.tuple() };
    }
    case 0x54: {
      // 'T'
      const n = r.u32();
      const options = r.u8();
      const relationOids: number[] = [];
      for (let i = 0; i < n; i++) relationOids.push(r.u32());
      return {
        tag: 'truncate',
        cascade: (options & 1) !== 0,
        restartIdentity: (options & 2) !== 0,
        relationOids,
      };
    }
    case 0x4d: {
      // 'M'
      const transactional = r.u8() === 1;
      const lsn = r.u64();
      const prefix = r.cstring();
      const len = r.i32();
      return { tag: 'message', transactional, lsn, prefix, content: r.bytes(len) };
    }
    default:
      throw new Error(`pgoutput: unknown message tag 0x${tag.toString(16)}`);
  }
}
