/**
 * A source's snapshot as the supervisor sees it, for /readyz, the status page and the metrics:
 * begun from the buffer's record, moved on by the progress that each stored batch carries (so it
 * says what is durable, never what is only read).
 */
import type { PendingSnapshot, SnapshotProgress, SnapshotTableState } from '../common/protocol.js';

export const SNAPSHOT_TABLE_STATES = [
  'pending',
  'running',
  'done',
  'skipped_no_key',
  'not_published',
] as const;
export type SnapshotTableStateName = (typeof SNAPSHOT_TABLE_STATES)[number];

export interface SnapshotReport {
  readonly id: number;
  readonly reason: string;
  readonly state: 'running' | 'done';
  /** Tables by state; `pending` until their first chunk is stored. */
  readonly tables: Readonly<Record<SnapshotTableStateName, number>>;
  /** Rows stored by this snapshot, in this process and before it. */
  readonly rows: number;
  /** The table being copied, if known. */
  readonly current: string | null;
}

/** A table the copy has not begun (running, no chunk yet) shows as pending. */
function shownState(t: SnapshotTableState): SnapshotTableStateName {
  return t.chunks === 0 && t.state === 'running' ? 'pending' : t.state;
}

export class SnapshotProgressTracker {
  private id = 0;
  private reason = '';
  private finished = false;
  private rows = 0;
  private current: string | null = null;
  private readonly tables = new Map<string, SnapshotTableStateName>();

  /** The snapshot the reader is given (null: none). */
  begin(snapshot: PendingSnapshot | null): void {
    this.tables.clear();
    this.current = null;
    if (snapshot === null) {
      this.id = 0;
      return;
    }
    this.id = snapshot.id;
    this.reason = snapshot.reason;
    this.finished = false;
    this.rows = snapshot.rows;
    for (const t of snapshot.tables) this.tables.set(`${t.schema}.${t.table}`, shownState(t));
  }

  /** Progress a stored batch carried. Returns true when the snapshot is now finished. */
  apply(progress: readonly SnapshotProgress[]): boolean {
    let ended = false;
    for (const p of progress) {
      if (p.snapshotId !== this.id) continue;
      this.rows += p.rows;
      if (p.table !== '') {
        const name = `${p.schema}.${p.table}`;
        this.tables.set(name, shownState(p));
        if (p.chunks > 0) this.current = p.state === 'running' ? name : null;
      }
      if (p.finished && !this.finished) {
        this.finished = true;
        this.current = null;
        ended = true;
      }
    }
    return ended;
  }

  report(): SnapshotReport | null {
    if (this.id === 0) return null;
    const tables = { pending: 0, running: 0, done: 0, skipped_no_key: 0, not_published: 0 };
    for (const state of this.tables.values()) tables[state]++;
    return {
      id: this.id,
      reason: this.reason,
      state: this.finished ? 'done' : 'running',
      tables,
      rows: this.rows,
      current: this.current,
    };
  }
}
