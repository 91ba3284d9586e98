/**
 * A growing buffer of COPY text (UTF-8) that values are written into straight from the bytes of
 * the pgoutput message: no JS string per value, no second encoding pass. pgoutput sends text in
 * the client encoding, which pg sets to UTF-8, so a value's bytes can be copied as they are once
 * the characters that JSON or COPY treat specially are escaped.
 *
 * Two layers of escaping meet here. A text value becomes a JSON string ('"' and '\' and control
 * characters escaped), and that JSON then sits in a COPY text field, where every '\' is doubled
 * and tab, newline and carriage return must not appear raw.
 */

const COPY_SPECIAL = /[\\\n\r\t]/;

/** Escapes a value for COPY text format (tab-separated, backslash escapes). */
export function copyEscape(text: string): string {
  if (!COPY_SPECIAL.test(text)) return text;
  return text.replace(/[\\\n\r\t]/g, (c) =>
    c === '\\' ? '\\\\' : c === '\n' ? '\\n' : c === '\r' ? '\\r' : '\\t',
  );
}

const BACKSLASH = 0x5c;
const QUOTE = 0x22;

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
const HEX_UPPER = Buffer.from('0123456789ABCDEF', 'latin1');

/** Node's Buffer has this method (undocumented in the types): encode without argument checks. */
interface Utf8Writable {
  utf8Write(text: string, offset: number): number;
}

export class CopyText {
  buf: Buffer;
  length = 0;

  constructor(initialBytes = 1 << 20) {
    this.buf = Buffer.allocUnsafeSlow(initialBytes);
  }

  /** Makes room for n more bytes. Every writer below calls it first. */
  ensure(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafeSlow(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(grown, 0, 0, this.length);
    this.buf = grown;
  }

  /** Hands over the bytes written so far as a fresh (transferable) ArrayBuffer, and empties. */
  take(): ArrayBuffer {
    // allocUnsafeSlow gives a Buffer of its own, never a SharedArrayBuffer.
    const { buffer, byteOffset } = this.buf as Buffer & { buffer: ArrayBuffer };
    const data = buffer.slice(byteOffset, byteOffset + this.length);
    this.length = 0;
    return data;
  }

  byte(b: number): void {
    this.ensure(1);
    this.buf[this.length++] = b;
  }

  /** Bytes that need no escaping (prepared fragments, digits). */
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

  /** A string that is already COPY text (escaped by the caller), as UTF-8. */
  text(s: string): void {
    this.ensure(s.length * 3);
    this.length += (this.buf as unknown as Utf8Writable).utf8Write(s, this.length);
  }

  /** Any string, COPY-escaped, as UTF-8. */
  escapedText(s: string): void {
    this.text(copyEscape(s));
  }

  /** A non-negative integer in decimal. */
  decimal(n: number): void {
    let digits = 1;
    for (let m = n; m >= 10; m = Math.floor(m / 10)) digits++;
    this.ensure(digits);
    const out = this.buf;
    let p = this.length + digits;
    this.length = p;
    do {
      out[--p] = 0x30 + (n % 10);
      n = Math.floor(n / 10);
    } while (n > 0);
  }

  /** An LSN as PostgreSQL prints it: upper-case hex 'X/Y' without leading zeros. */
  lsn(lsn: number): void {
    this.hexWord(Math.floor(lsn / 4294967296));
    this.byte(0x2f);
    this.hexWord(lsn % 4294967296);
  }

  private hexWord(n: number): void {
    this.ensure(8);
    let shift = 28;
    while (shift > 0 && (n >>> shift) % 16 === 0) shift -= 4;
    for (; shift >= 0; shift -= 4) this.buf[this.length++] = HEX_UPPER[(n >>> shift) & 15]!;
  }

  /**
   * UTF-8 text as a JSON string literal, COPY-escaped: what JSON.stringify would give, with its
   * backslashes doubled and no raw tab or newline.
   */
  jsonString(src: Uint8Array, start: number, end: number): void {
    // Worst case: a control character becomes \\u00XX, 7 bytes.
    this.ensure((end - start) * 7 + 2);
    const out = this.buf;
    let p = this.length;
    out[p++] = QUOTE;
    for (let i = start; i < end; i++) {
      const c = src[i]!;
      if (c >= 0x20 && c !== QUOTE && c !== BACKSLASH) {
        out[p++] = c;
        continue;
      }
      // JSON's backslash, doubled for COPY.
      out[p++] = BACKSLASH;
      out[p++] = BACKSLASH;
      const letter = JSON_ESCAPE_LETTER[c]!;
      if (c === BACKSLASH) {
        out[p++] = BACKSLASH;
        out[p++] = BACKSLASH;
      } else if (letter !== 0) {
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
   * JSON text (a json or jsonb value) as it is, COPY-escaped. Returns false, having written
   * nothing, if it holds the escape \u0000, which json accepts and the buffer's jsonb does not:
   * the caller then stores the value another way.
   */
  jsonVerbatim(src: Uint8Array, start: number, end: number): boolean {
    this.ensure((end - start) * 2);
    const out = this.buf;
    let p = this.length;
    for (let i = start; i < end; i++) {
      const c = src[i]!;
      if (c === BACKSLASH) {
        // Inside a JSON string: an escape pair. Copy both, so '\\u0000' (an escaped backslash
        // and then plain text) is not mistaken for the escape \u0000.
        const next = src[i + 1];
        if (
          next === 0x75 &&
          src[i + 2] === 0x30 &&
          src[i + 3] === 0x30 &&
          src[i + 4] === 0x30 &&
          src[i + 5] === 0x30
        ) {
          return false;
        }
        out[p++] = BACKSLASH;
        out[p++] = BACKSLASH;
        if (next === BACKSLASH) {
          out[p++] = BACKSLASH;
          out[p++] = BACKSLASH;
          i++;
        }
      } else if (c === 0x0a) {
        out[p++] = BACKSLASH;
        out[p++] = 0x6e;
      } else if (c === 0x09) {
        out[p++] = BACKSLASH;
        out[p++] = 0x74;
      } else if (c === 0x0d) {
        out[p++] = BACKSLASH;
        out[p++] = 0x72;
      } else {
        out[p++] = c;
      }
    }
    this.length = p;
    return true;
  }
}
