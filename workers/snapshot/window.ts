/**
 * The DBLog watermark window for one chunk of one table (Netflix's DBLog, Debezium's incremental
 * snapshots): the reader writes a low watermark into the stream (a transactional logical
 * message), reads the chunk, writes a high watermark. Between the two watermarks in the stream,
 * every change to a key of the table is noted; at the high watermark, the chunk's rows whose key
 * changed are dropped (the stream carries them, and later), and the rest land as SNAPSHOT events
 * right there: after every change the chunk already reflects, before every change it does not.
 *
 * Keys are compared as the text PostgreSQL prints for the key columns, joined: the chunk query
 * runs with the replication connection's session settings, so both sides print alike.
 *
 * The TOAST catch (not in the DBLog paper): with the default replica identity, an UPDATE that
 * leaves a TOASTed column alone does not carry it. Dropping the chunk's row for such a key would
 * leave a consumer that never saw the row without that column. Such a key is not dropped but
 * read again (`reread`), inside a window of its own, until a window passes without such an update.
 */

export interface Watermark {
  /** Identifies the reader run: watermarks of an earlier run, met again after a restart, are void. */
  readonly run: string;
  readonly snapshot: number;
  readonly table: string;
  readonly chunk: number;
  readonly mark: 'low' | 'high';
}

export const WATERMARK_PREFIX = 'philotes.snapshot';

export function watermarkContent(w: Watermark): string {
  return JSON.stringify(w);
}

/** A watermark message's content, or null if it is not one of ours (or not well formed). */
export function parseWatermark(content: Uint8Array): Watermark | null {
  try {
    const w = JSON.parse(Buffer.from(content).toString('utf8')) as Partial<Watermark>;
    if (
      typeof w.run !== 'string' ||
      typeof w.snapshot !== 'number' ||
      typeof w.table !== 'string' ||
      typeof w.chunk !== 'number' ||
      (w.mark !== 'low' && w.mark !== 'high')
    ) {
      return null;
    }
    return w as Watermark;
  } catch {
    return null;
  }
}

/** Joins key column texts into one comparable string (NUL cannot occur in PostgreSQL text). */
export function keyOf(texts: ReadonlyArray<string | null>): string {
  return texts.map((t) => (t === null ? '\u0001' : t)).join('\u0000');
}

/** The key columns' texts of a key (keyOf's inverse; key columns are never NULL). */
export function splitKey(key: string): string[] {
  return key.split('\u0000');
}

/**
 * The open window of one chunk. Its rows' keys arrive when the chunk query returns, which may be before
 * or after the stream meets the low watermark, but always before the high one (it is written
 * after the query).
 */
export class SnapshotWindow {
  private readonly changed = new Set<string>();
  /** Keys an UPDATE without every column (unchanged TOAST) touched: read again, not dropped. */
  private readonly partial = new Set<string>();
  /** Everything the chunk holds is void (the table was truncated inside the window). */
  private truncated = false;
  /**
   * What the chunk does to its table's progress if no key of it must be read again (set when its
   * rows are read; see reread).
   */
  progress: {
    schema: string;
    table: string;
    state: 'running' | 'done' | 'skipped_no_key' | 'not_published';
    lastKey: readonly string[] | null;
    chunks: number;
  } | null = null;
  /** Keys (their columns' texts) of the chunk's rows to read again; set once it is closed. */
  reread: ReadonlyArray<readonly string[]> = [];
  private open = false;
  private rowCount = -1;
  private keyAt: (i: number) => string = () => '';

  constructor(
    readonly table: string,
    readonly chunk: number,
  ) {}

  /** The stream met the low watermark: from here on, changes to the table's keys count. */
  openAt(): void {
    this.open = true;
  }

  get isOpen(): boolean {
    return this.open;
  }

  /** A change to `key` of this window's table, met in the stream. */
  noteChange(key: string): void {
    if (this.open) this.changed.add(key);
  }

  /** An UPDATE of `key` met in the stream that did not carry every column (unchanged TOAST). */
  notePartialUpdate(key: string): void {
    if (this.open) this.partial.add(key);
  }

  /** The table was truncated in the window: none of the chunk's rows exist any more. */
  noteTruncate(): void {
    if (this.open) this.truncated = true;
  }

  /**
   * A streamed transaction that changed the table committed inside the window: which of the
   * chunk's keys it changed is not known here (its keys are not kept), so the chunk is read
   * again, nothing of it stored.
   */
  noteRedo(): void {
    if (this.open) this.redo = true;
  }

  /** The chunk must be read again (see noteRedo); set once it is closed. */
  redo = false;

  /**
   * The chunk before this one (read ahead of it) must be read again: this one's rows and
   * progress rest on it, so they go too.
   */
  void(): void {
    this.redo = true;
  }

  /**
   * The chunk's rows: how many, and each one's key (keyOf), asked for only when a change in the
   * window has to be looked for among them.
   */
  setRows(count: number, keyAt: (i: number) => string): void {
    this.rowCount = count;
    this.keyAt = keyAt;
  }

  /**
   * The stream met the high watermark: the indexes of the chunk's rows that no change in the
   * window touched. Throws if the rows are not there (they are read before the high watermark is
   * written).
   */
  close(): number[] {
    if (!this.open)
      throw new Error(
        `snapshot: high watermark of ${this.table} chunk ${this.chunk} without its low one`,
      );
    const count = this.rowCount;
    if (count < 0)
      throw new Error(
        `snapshot: high watermark of ${this.table} chunk ${this.chunk} before its rows`,
      );
    this.open = false;
    if (this.truncated || this.redo) return [];
    const kept: number[] = [];
    const reread: string[][] = [];
    if (this.changed.size === 0 && this.partial.size === 0) {
      for (let i = 0; i < count; i++) kept.push(i);
      return kept;
    }
    for (let i = 0; i < count; i++) {
      const key = this.keyAt(i);
      if (this.partial.has(key)) reread.push(splitKey(key));
      else if (!this.changed.has(key)) kept.push(i);
    }
    this.reread = reread;
    return kept;
  }
}
