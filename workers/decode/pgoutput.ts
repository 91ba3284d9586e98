/**
 * pgoutput protocol (versions 1 and 2) messages, decoded from the bytes of one XLogData payload.
 * Version 2 adds streamed in-progress transactions: Stream Start/Stop blocks whose messages carry
 * the (sub)transaction's xid after their tag, then a Stream Commit or Stream Abort.
 * We decode ourselves rather than use pg-logical-replication's parser because that one runs every
 * value through pg's global type parsers (timestamps become Dates and lose microseconds) and
 * produces objects that cannot cross a MessagePort. Tuple values stay as the server's text.
 * Reference: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
 *
 * Two paths: PgoutputDecoder reads the row-level messages (Begin, Commit, Insert, Update, Delete)
 * in place, without allocating; parsePgoutput turns the rare others into objects.
 */

export interface RelationColumn {
  readonly flags: number; // 1 = part of the replica identity
  readonly name: string;
  readonly typeOid: number;
  readonly typeMod: number;
}

/** The messages other than the row-level ones (see PgoutputDecoder). */
export type PgoutputMessage =
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
}

const KIND_NULL = 0x6e; // 'n'
const KIND_UNCHANGED = 0x75; // 'u'
const KIND_TEXT = 0x74; // 't'

/**
 * One TupleData, located in the message without copying or decoding it: per column its kind
 * ('n' NULL, 'u' unchanged TOAST, 't' text) and where its text bytes are. The hot path writes
 * COPY bytes straight from here; a reader keeps two views and reuses them for every row.
 */
export class TupleView {
  buf: Buffer = EMPTY;
  /**
   * `buf` is a message buffer of its own that nothing reuses: a large value may be handed over
   * by reference (see CopyBuffer.segment), its memory going with the batch.
   */
  owned = false;
  count = 0;
  kinds = new Uint8Array(32);
  starts = new Int32Array(32);
  ends = new Int32Array(32);

  /** Locates the tuple that starts at `offset`; returns the offset just after it. */
  read(buf: Buffer, offset: number): number {
    if (offset + 2 > buf.length) throw new RangeError('pgoutput: truncated tuple');
    const n = (buf[offset]! << 8) | buf[offset + 1]!;
    let off = offset + 2;
    if (n > this.kinds.length) this.grow(n);
    const { kinds, starts, ends } = this;
    for (let i = 0; i < n; i++) {
      const kind = buf[off++];
      if (kind === KIND_TEXT) {
        if (off + 4 > buf.length) throw new RangeError('pgoutput: truncated tuple');
        const len = buf.readInt32BE(off);
        off += 4;
        if (len < 0 || off + len > buf.length) throw new RangeError('pgoutput: truncated tuple');
        starts[i] = off;
        ends[i] = off + len;
        off += len;
      } else if (kind !== KIND_NULL && kind !== KIND_UNCHANGED) {
        if (kind === undefined) throw new RangeError('pgoutput: truncated tuple');
        // 'b' (binary) is only sent when asked for; we never ask.
        throw new Error(`pgoutput: unexpected tuple value kind 0x${kind.toString(16)}`);
      }
      kinds[i] = kind;
    }
    this.buf = buf;
    this.count = n;
    return off;
  }

  /**
   * Locates a protocol DataRow body (a query's row, every column as text: Int16 count, then per
   * column Int32 length, -1 for NULL, and the bytes) at `offset`, as a tuple of 't' and 'n'
   * values; returns the offset just after it. A snapshot's chunk rows are read this way.
   */
  readDataRow(buf: Buffer, offset: number): number {
    if (offset + 2 > buf.length) throw new RangeError('DataRow: truncated');
    const n = (buf[offset]! << 8) | buf[offset + 1]!;
    let off = offset + 2;
    if (n > this.kinds.length) this.grow(n);
    const { kinds, starts, ends } = this;
    for (let i = 0; i < n; i++) {
      if (off + 4 > buf.length) throw new RangeError('DataRow: truncated');
      const len = buf.readInt32BE(off);
      off += 4;
      if (len < 0) {
        kinds[i] = KIND_NULL;
        continue;
      }
      if (off + len > buf.length) throw new RangeError('DataRow: truncated');
      kinds[i] = KIND_TEXT;
      starts[i] = off;
      ends[i] = off + len;
      off += len;
    }
    this.buf = buf;
    this.owned = false;
    this.count = n;
    return off;
  }

  isNull(i: number): boolean {
    return this.kinds[i] === KIND_NULL;
  }

  isUnchanged(i: number): boolean {
    return this.kinds[i] === KIND_UNCHANGED;
  }

  /** Column i's text (for the slow paths; the hot path copies bytes). */
  text(i: number): string {
    // utf8Slice is what toString('utf8', …) calls after checking its arguments.
    return (this.buf as unknown as Utf8Sliceable).utf8Slice(this.starts[i]!, this.ends[i]!);
  }

  private grow(n: number): void {
    this.kinds = new Uint8Array(n);
    this.starts = new Int32Array(n);
    this.ends = new Int32Array(n);
  }
}

const EMPTY = Buffer.alloc(0);

/**
 * The row-level messages, decoded without allocating: what the reader calls for each. Every other
 * message (Relation, Truncate, Type, Origin, logical Message) comes as a parsed object to `other`.
 * LSNs and times are Numbers: exact below 2^53 (8 PiB of WAL; ±285 years of microseconds).
 */
export interface PgoutputHandler {
  begin(finalLsn: number, commitTimeUs: number, xid: number): void;
  commit(commitLsn: number, endLsn: number, commitTimeUs: number): void;
  insert(relationOid: number, after: TupleView): void;
  update(
    relationOid: number,
    beforeKind: 'K' | 'O' | null,
    before: TupleView | null,
    after: TupleView,
  ): void;
  delete(relationOid: number, beforeKind: 'K' | 'O', before: TupleView): void;
  other(message: PgoutputMessage): void;
  /** A block of changes of the in-progress transaction `xid` begins (protocol 2). */
  streamStart(xid: number): void;
  /** Within a block: the (sub)transaction that made the change about to be handed over. */
  streamChange(xid: number): void;
  streamStop(): void;
  /** The streamed transaction committed: its changes are complete. */
  streamCommit(xid: number, commitLsn: number, endLsn: number, commitTimeUs: number): void;
  /** The streamed transaction (subXid = xid) or one of its subtransactions aborted. */
  streamAbort(xid: number, subXid: number): void;
}

/** An unsigned 64-bit big-endian integer as a Number (exact below 2^53). */
function u64Number(buf: Buffer, offset: number): number {
  return buf.readUInt32BE(offset) * 4294967296 + buf.readUInt32BE(offset + 4);
}

function i64Number(buf: Buffer, offset: number): number {
  return buf.readInt32BE(offset) * 4294967296 + buf.readUInt32BE(offset + 4);
}

/** Decodes the pgoutput message at buf[offset…] and calls the handler; two reused tuple views. */
export class PgoutputDecoder {
  private readonly before = new TupleView();
  private readonly after = new TupleView();
  /** Inside a Stream Start/Stop block: messages carry an xid after their tag. */
  private streaming = false;

  decode(buf: Buffer, offset: number, h: PgoutputHandler, owned = false): void {
    const tag = buf[offset];
    this.before.owned = owned;
    this.after.owned = owned;
    // In a stream block a message's body starts 4 bytes later, after the xid; Stream Stop and
    // Origin (sent after a Stream Start for a transaction replicated from elsewhere) have none.
    let body = offset + 1;
    if (this.streaming && tag !== 0x45 && tag !== 0x4f) {
      h.streamChange(buf.readUInt32BE(body));
      body += 4;
    }
    switch (tag) {
      case 0x42: // 'B'
        h.begin(u64Number(buf, body), i64Number(buf, body + 8), buf.readUInt32BE(body + 16));
        return;
      case 0x43: // 'C': flags, commit LSN, end LSN, commit time
        h.commit(u64Number(buf, body + 1), u64Number(buf, body + 9), i64Number(buf, body + 17));
        return;
      case 0x49: {
        // 'I': relation, 'N', new tuple
        const oid = buf.readUInt32BE(body);
        this.after.read(buf, body + 5);
        h.insert(oid, this.after);
        return;
      }
      case 0x55: {
        // 'U': relation, optional 'K'/'O' old tuple, 'N' new tuple
        const oid = buf.readUInt32BE(body);
        const kind = buf[body + 4];
        if (kind === 0x4b || kind === 0x4f) {
          const next = this.before.read(buf, body + 5);
          this.after.read(buf, next + 1);
          h.update(oid, kind === 0x4b ? 'K' : 'O', this.before, this.after);
        } else {
          this.after.read(buf, body + 5);
          h.update(oid, null, null, this.after);
        }
        return;
      }
      case 0x44: {
        // 'D': relation, 'K'/'O', old tuple
        const oid = buf.readUInt32BE(body);
        const kind = buf[body + 4] === 0x4b ? 'K' : 'O';
        this.before.read(buf, body + 5);
        h.delete(oid, kind, this.before);
        return;
      }
      case 0x53: // 'S': Stream Start: xid, first segment
        this.streaming = true;
        h.streamStart(buf.readUInt32BE(body));
        return;
      case 0x45: // 'E': Stream Stop
        this.streaming = false;
        h.streamStop();
        return;
      case 0x63: // 'c': Stream Commit: xid, flags, commit LSN, end LSN, commit time
        h.streamCommit(
          buf.readUInt32BE(body),
          u64Number(buf, body + 5),
          u64Number(buf, body + 13),
          i64Number(buf, body + 21),
        );
        return;
      case 0x41: // 'A': Stream Abort: xid, subtransaction xid
        h.streamAbort(buf.readUInt32BE(body), buf.readUInt32BE(body + 4));
        return;
      default:
        h.other(parsePgoutput(buf.subarray(offset), body - offset));
    }
  }
}

/** One of the messages PgoutputDecoder leaves to `other`, as an object. */
export function parsePgoutput(buf: Buffer, bodyOffset = 1): PgoutputMessage {
  const r = new Reader(buf);
  const tag = r.u8();
  r.offset = bodyOffset; // past the xid, in a stream block
  switch (tag) {
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
