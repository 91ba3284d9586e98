/**
 * A chunk's rows as the server sent them: DataRow bodies, copied back to back into one buffer.
 * pg would have made a string of every column; the encoder reads these bytes as it reads the
 * stream's tuples (TupleView.readDataRow), and only the key columns become strings (for the
 * window's comparison).
 */
import { TupleView } from '../decode/pgoutput.js';
import { keyOf } from './window.js';

/**
 * The bytes a chunk keeps at most: rows past them are let go (the chunk ends before them, the next
 * one starts there), so that a table of wide rows does not hold `snapshotChunkRows` of them in
 * memory at once.
 */
export const CHUNK_MAX_BYTES = 16 << 20;

export class ChunkRows {
  private buf = Buffer.allocUnsafe(1 << 16);
  private length = 0;
  private readonly offsets: number[] = [];
  /** Rows arrived past CHUNK_MAX_BYTES and were let go. */
  cut = false;

  constructor(private readonly maxBytes = CHUNK_MAX_BYTES) {}

  get count(): number {
    return this.offsets.length;
  }

  /** A DataRow body (valid only during the call: copied). */
  add(body: Buffer): void {
    if (this.length >= this.maxBytes) {
      this.cut = true;
      return;
    }
    if (this.length + body.length > this.buf.length) {
      const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.length + body.length));
      this.buf.copy(grown, 0, 0, this.length);
      this.buf = grown;
    }
    this.offsets.push(this.length);
    body.copy(this.buf, this.length);
    this.length += body.length;
  }

  /** Row i, located in `tuple` (which is reused). */
  view(i: number, tuple: TupleView): TupleView {
    tuple.readDataRow(this.buf, this.offsets[i]!);
    return tuple;
  }

  private readonly keyView = new TupleView();

  /** Row i's key (keyOf of its key columns' texts). */
  key(i: number, keyIndexes: readonly number[]): string {
    const tuple = this.view(i, this.keyView);
    return keyOf(keyIndexes.map((k) => (tuple.isNull(k) ? null : tuple.text(k))));
  }

  /** Row i's key columns' texts (a primary key has no NULL). */
  keyTexts(i: number, keyIndexes: readonly number[]): string[] {
    const tuple = this.view(i, this.keyView);
    return keyIndexes.map((k) => tuple.text(k));
  }
}
