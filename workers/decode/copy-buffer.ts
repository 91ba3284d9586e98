/**
 * A growing buffer of rows in PostgreSQL's binary COPY format, written straight from the bytes of
 * the pgoutput message: no JS string per value, no second encoding pass.
 *
 * Binary rather than text COPY because the buffer database is the pipeline's busiest stage:
 * binary spares its backend parsing LSNs, integers, timestamps and arrays (about 15% of its CPU
 * per event, measured), and spares us COPY's escaping. The jsonb columns still take JSON text,
 * behind jsonb's version byte.
 *
 * pgoutput sends text in the client encoding, which pg sets to UTF-8, so a value's bytes can be
 * copied as they are once JSON's special characters are escaped.
 *
 * Format: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4 — a header, then
 * per row an int16 field count and per field an int32 length (-1 for NULL) and the bytes, then
 * an int16 -1. The reader writes rows only; the writer adds header and trailer per COPY.
 */
import type { CopySegment } from '../../src/common/protocol.js';

const BACKSLASH = 0x5c;
const QUOTE = 0x22;
const TEXT_OID = 25;
const TWO_32 = 4294967296;

/** For each byte below 0x20 (and '"', '\'): its JSON escape letter, or 0 for \u00XX. */
const JSON_ESCAPE_LETTER = (() => {
  const t = new Uint8Array(0x60);
  t[0x08] = 0x62; // \b
  t[0x09] = 0x74; // \t
  t[0x0a] = 0x6e; // \n
  t[0x0c] = 0x66; // \f
  t[0x0d] = 0x72; // \r
  t[QUOTE] = QUOTE;
  t[BACKSLASH] = BACKSLASH;
  return t;
})();

const HEX = Buffer.from('0123456789abcdef', 'latin1');

/** Node's Buffer has this method (undocumented in the types): encode without argument checks. */
interface Utf8Writable {
  utf8Write(text: string, offset: number): number;
}

/** Room kept after a large value for the rest of its row (key, details, the next row's head). */
const ROW_SLACK_BYTES = 64 * 1024;

/** ES2024's resizable ArrayBuffer (Node 20 has it; the TypeScript lib in use does not). */
interface ResizableArrayBuffer extends ArrayBuffer {
  readonly resizable: boolean;
  resize(byteLength: number): void;
}
type ResizableArrayBufferConstructor = new (
  byteLength: number,
  options: { maxByteLength: number },
) => ResizableArrayBuffer;

/** Above this, a value's escaped size is counted rather than reserved at its worst case. */
const LARGE_VALUE_BYTES = 64 * 1024;

/** What take() hands over: the own bytes, and the segments that go between them. */
export interface TakenCopy {
  readonly data: ArrayBuffer;
  readonly segments: readonly CopySegment[];
}

export class CopyBuffer {
  buf: Buffer;
  length = 0;
  /** Large values placed by reference (see segment()), in position order. */
  segments: CopySegment[] = [];
  segmentBytes = 0;

  /**
   * @param initialBytes the buffer's starting size.
   * @param keepBytes after take(), a buffer grown beyond this is let go for a fresh one.
   */
  constructor(
    private readonly initialBytes = 1 << 20,
    private readonly keepBytes = 16 * initialBytes,
  ) {
    this.buf = Buffer.allocUnsafeSlow(initialBytes);
  }

  /** Makes room for n more bytes. Every writer below calls it first. */
  ensure(n: number): void {
    if (this.length + n <= this.buf.length) return;
    this.grow(this.length + n);
  }

  /**
   * Doubles, unless one write needs more than that (a large value): then exactly what it needs
   * and a little more for the rest of its row, not twice the value. A buffer beyond `keepBytes`
   * lives on a resizable ArrayBuffer, so that take() can hand it over trimmed instead of copied.
   */
  private grow(needed: number): void {
    const doubled = this.buf.length * 2;
    const size = needed <= doubled ? doubled : needed + (needed >>> 6) + ROW_SLACK_BYTES;
    const grown =
      size > this.keepBytes
        ? Buffer.from(
            new (ArrayBuffer as unknown as ResizableArrayBufferConstructor)(size, {
              maxByteLength: size,
            }),
            0,
            size,
          )
        : Buffer.allocUnsafeSlow(size);
    this.buf.copy(grown, 0, 0, this.length);
    this.buf = grown;
  }

  /**
   * Places `data` at the current position without copying it: the caller guarantees that its
   * memory is not reused (a message buffer of its own), and gives it up with the batch.
   */
  segment(data: Uint8Array): void {
    this.segments.push({ at: this.length, data });
    this.segmentBytes += data.length;
  }

  /** Drops everything written from `length` on (a half-written row). */
  truncate(length: number): void {
    this.length = length;
    while (this.segments.length > 0 && this.segments[this.segments.length - 1]!.at > length) {
      this.segmentBytes -= this.segments.pop()!.data.length;
    }
  }

  /** Own bytes and segment bytes. */
  get size(): number {
    return this.length + this.segmentBytes;
  }

  /** Hands over what was written (own bytes as a transferable ArrayBuffer, and the segments). */
  takeAll(): TakenCopy {
    const segments = this.segments;
    this.segments = [];
    this.segmentBytes = 0;
    return { data: this.take(), segments };
  }

  /** Hands over the bytes written so far as a fresh (transferable) ArrayBuffer, and empties. */
  take(): ArrayBuffer {
    // allocUnsafeSlow and grow() give a Buffer of its own, never a SharedArrayBuffer.
    const { buffer, byteOffset } = this.buf as Buffer & { buffer: ArrayBuffer };
    let data: ArrayBuffer;
    if ((buffer as ResizableArrayBuffer).resizable === true) {
      // A buffer grown for large values goes as it is, trimmed: copying it would double the
      // memory a large value costs. It was going to be let go anyway (see below).
      (buffer as ResizableArrayBuffer).resize(this.length);
      data = buffer;
      this.buf = Buffer.allocUnsafeSlow(this.initialBytes);
    } else {
      data = buffer.slice(byteOffset, byteOffset + this.length);
      // One huge row (a large TOASTed value) must not pin its size for the life of the reader.
      if (this.buf.length > this.keepBytes) this.buf = Buffer.allocUnsafeSlow(this.initialBytes);
    }
    this.length = 0;
    return data;
  }

  byte(b: number): void {
    this.ensure(1);
    this.buf[this.length++] = b;
  }

  /** Bytes as they are (prepared fragments, values that need no escaping). */
  bytes(src: Uint8Array, start = 0, end = src.length): void {
    const n = end - start;
    this.ensure(n);
    const out = this.buf;
    let p = this.length;
    if (n > 64) {
      out.set(src.subarray(start, end), p);
      p += n;
    } else {
      for (let i = start; i < end; i++) out[p++] = src[i]!;
    }
    this.length = p;
  }

  /** A string as UTF-8. */
  text(s: string): void {
    this.ensure(s.length * 3);
    this.length += (this.buf as unknown as Utf8Writable).utf8Write(s, this.length);
  }

  int16(n: number): void {
    this.ensure(2);
    const out = this.buf;
    const p = this.length;
    out[p] = (n >>> 8) & 0xff;
    out[p + 1] = n & 0xff;
    this.length = p + 2;
  }

  int32(n: number): void {
    this.ensure(4);
    const out = this.buf;
    const p = this.length;
    out[p] = (n >>> 24) & 0xff;
    out[p + 1] = (n >>> 16) & 0xff;
    out[p + 2] = (n >>> 8) & 0xff;
    out[p + 3] = n & 0xff;
    this.length = p + 4;
  }

  /** A 64-bit integer given as a Number (exact within ±2^53: LSNs, xids, microsecond times). */
  int64(n: number): void {
    const high = Math.floor(n / TWO_32);
    this.int32(high);
    this.int32(n - high * TWO_32);
  }

  /** Fields of fixed size, with their length word. */
  int32Field(n: number): void {
    this.int32(4);
    this.int32(n);
  }

  int64Field(n: number): void {
    this.int32(8);
    this.int64(n);
  }

  nullField(): void {
    this.int32(-1);
  }

  /** A text field from a string. */
  textField(s: string): void {
    const at = this.openField();
    this.text(s);
    this.closeField(at);
  }

  /** A text[] field (one dimension, no NULLs), as array_send writes it. */
  textArrayField(items: readonly string[]): void {
    const at = this.openField();
    this.int32(items.length === 0 ? 0 : 1); // dimensions
    this.int32(0); // no NULLs
    this.int32(TEXT_OID);
    if (items.length > 0) {
      this.int32(items.length);
      this.int32(1); // lower bound
    }
    for (const item of items) this.textField(item);
    this.closeField(at);
  }

  /** Starts a field of unknown length: reserves its length word. Pass the result to closeField. */
  openField(): number {
    this.ensure(4);
    const at = this.length;
    this.length += 4;
    return at;
  }

  closeField(at: number): void {
    let n = this.length - at - 4;
    // Segments placed inside the field count too (rare: only large values are placed).
    for (let k = this.segments.length - 1; k >= 0 && this.segments[k]!.at > at; k--) {
      n += this.segments[k]!.data.length;
    }
    const out = this.buf;
    out[at] = (n >>> 24) & 0xff;
    out[at + 1] = (n >>> 16) & 0xff;
    out[at + 2] = (n >>> 8) & 0xff;
    out[at + 3] = n & 0xff;
  }

  /** UTF-8 text as a JSON string literal: exactly what JSON.stringify gives for it. */
  jsonString(src: Uint8Array, start: number, end: number): void {
    // Worst case: a control character becomes \u00XX, 6 bytes. Reserving that is cheap for
    // ordinary values; for a large one, count what it really needs.
    const n = end - start;
    this.ensure(n <= LARGE_VALUE_BYTES ? n * 6 + 2 : escapedJsonLength(src, start, end) + 2);
    const out = this.buf;
    let p = this.length;
    out[p++] = QUOTE;
    for (let i = start; i < end; i++) {
      const c = src[i]!;
      if (c >= 0x20 && c !== QUOTE && c !== BACKSLASH) {
        out[p++] = c;
        continue;
      }
      out[p++] = BACKSLASH;
      const letter = JSON_ESCAPE_LETTER[c]!;
      if (letter !== 0) {
        out[p++] = letter;
      } else {
        out[p++] = 0x75; // u
        out[p++] = 0x30;
        out[p++] = 0x30;
        out[p++] = HEX[c >> 4]!;
        out[p++] = HEX[c & 15]!;
      }
    }
    out[p++] = QUOTE;
    this.length = p;
  }

  /**
   * A large value that needs no escaping, placed by reference (see segment()) as a JSON string:
   * `prefix` (already JSON, e.g. '\\x' for bytea) and src[start, end) between quotes. Returns
   * false, having written nothing, if some byte would need escaping.
   */
  jsonStringSegment(src: Uint8Array, start: number, end: number, prefix = ''): boolean {
    if (escapedJsonLength(src, start, end) !== end - start) return false;
    this.byte(QUOTE);
    if (prefix !== '') this.text(prefix);
    this.segment(src.subarray(start, end));
    this.byte(QUOTE);
    return true;
  }

  /** A large json value placed by reference; false (nothing written) as for jsonVerbatim. */
  jsonSegment(src: Uint8Array, start: number, end: number): boolean {
    if (hasJsonNulEscape(src, start, end)) return false;
    this.segment(src.subarray(start, end));
    return true;
  }

  /**
   * JSON text (a json or jsonb value) as it is. Returns false, having written nothing, if it
   * holds the escape \u0000, which json accepts and the buffer's jsonb does not: the caller then
   * stores the value another way.
   */
  jsonVerbatim(src: Uint8Array, start: number, end: number): boolean {
    if (hasJsonNulEscape(src, start, end)) return false;
    this.bytes(src, start, end);
    return true;
  }
}

/** JSON text holding the escape \u0000 (inside a string). */
function hasJsonNulEscape(src: Uint8Array, start: number, end: number): boolean {
  for (let i = start; i < end; i++) {
    if (src[i] !== BACKSLASH) continue;
    // Inside a JSON string: an escape pair. Skip both, so '\\u0000' (an escaped backslash and
    // then plain text) is not mistaken for the escape \u0000.
    i++;
    if (
      src[i] === 0x75 &&
      src[i + 1] === 0x30 &&
      src[i + 2] === 0x30 &&
      src[i + 3] === 0x30 &&
      src[i + 4] === 0x30
    ) {
      return true;
    }
  }
  return false;
}

/** The length of UTF-8 text once escaped as JSON string content. */
function escapedJsonLength(src: Uint8Array, start: number, end: number): number {
  let n = end - start;
  for (let i = start; i < end; i++) {
    const c = src[i]!;
    if (c >= 0x20 && c !== QUOTE && c !== BACKSLASH) continue;
    n += JSON_ESCAPE_LETTER[c] !== 0 ? 1 : 5;
  }
  return n;
}
