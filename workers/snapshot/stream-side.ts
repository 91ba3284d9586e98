/**
 * The snapshot's side of the stream. The runner (runner.ts) copies chunks over its own
 * connections between two watermarks; this object sees the stream those watermarks travel in.
 * The reader tells it every change it decodes, in stream order; it notes which chunk rows those
 * changes touch while a window is open, and decides, at a chunk's high watermark, which rows
 * become SNAPSHOT events in the watermark's transaction (with the chunk's progress). Snapshots
 * run one at a time, in the order they were asked for. Why a window is exact, case by case:
 * docs/design/snapshot.md.
 */
import { randomUUID } from 'node:crypto';
import type pg from 'pg';
import type { Logger } from '../../src/common/logger.js';
import type { PendingSnapshot, ReaderSettings } from '../../src/common/protocol.js';
import { supports } from '../../src/common/server-features.js';
import type { BatchBuilder } from '../decode/event-rows.js';
import type { TupleView } from '../decode/pgoutput.js';
import type { RelationCatalog } from '../source-session.js';
import { SnapshotRunner, type SnapshotTable } from './runner.js';
import { keyOf, parseWatermark, type SnapshotWindow } from './window.js';

export interface SnapshotStreamOptions {
  readonly builder: BatchBuilder;
  readonly catalog: RelationCatalog;
  readonly publication: string;
  /** 'schema.table' of tables never captured, so never copied either. */
  readonly skipped: ReadonlySet<string>;
  readonly settings: Pick<ReaderSettings, 'snapshotChunkRows' | 'snapshotParallelTables'>;
  readonly log: Logger;
  /** The copy failed: the reader fails with it. */
  fail(error: unknown): void;
  /** Whether a queued snapshot may start now (the reader neither stopping nor failed). */
  mayStart(): boolean;
}

export class SnapshotStreamSide {
  /** The snapshot copying now, if any. */
  private runner: SnapshotRunner | null = null;
  /** Snapshots asked for while one runs, or before streaming started. */
  private readonly queue: PendingSnapshot[] = [];
  /** The copy connection's options, once streaming has started. */
  private connection: pg.ClientConfig | null = null;
  private supported = false;
  /** The tables the running snapshot copies now, and the window each is in. */
  private readonly tables = new Map<
    number,
    { table: SnapshotTable; window: () => SnapshotWindow | null }
  >();
  /** The streamed transaction whose block is open (0: none). */
  private streamXid = 0;
  /** Tables that each open streamed transaction changed (see streamCommit). */
  private readonly streamTouched = new Map<number, Set<number>>();

  constructor(private readonly o: SnapshotStreamOptions) {}

  /**
   * Streaming has started: snapshots can copy now (on servers that send the watermark messages),
   * beginning with `initial` (the task's) or the first asked for meanwhile.
   */
  streaming(connection: pg.ClientConfig, serverVersion: number, initial: PendingSnapshot | null) {
    this.connection = connection;
    this.supported = supports(serverVersion, 'logicalMessages');
    const first = initial ?? this.queue.shift();
    if (first !== undefined) this.request(first);
  }

  /** Starts a snapshot's copy, or queues it behind the one running (one at a time, in order). */
  request(plan: PendingSnapshot): void {
    if (this.runner !== null) {
      if (this.runner.id !== plan.id && !this.queue.some((s) => s.id === plan.id))
        this.queue.push(plan);
      return;
    }
    const connection = this.connection;
    if (connection === null) {
      if (!this.queue.some((s) => s.id === plan.id)) this.queue.push(plan); // started by streaming()
      return;
    }
    if (!this.supported) {
      this.o.log.warn(
        { snapshot: plan.id },
        'snapshot: PostgreSQL before 14 cannot send the watermark messages a snapshot needs; the existing rows are not copied',
      );
      return;
    }
    const { catalog } = this.o;
    const runner = new SnapshotRunner({
      connection,
      publication: this.o.publication,
      skipped: this.o.skipped,
      snapshot: plan,
      run: randomUUID(),
      chunkRows: this.o.settings.snapshotChunkRows,
      parallelTables: this.o.settings.snapshotParallelTables,
      hooks: {
        resolve: (oid, schema, table) => catalog.resolveCatalogRelation(oid, schema, table),
        begin: (table, window) => this.tables.set(table.oid, { table, window }),
        end: (table) => this.tables.delete(table.oid),
      },
      log: this.o.log,
    });
    this.runner = runner;
    runner.runAll().then(
      () => {
        this.o.log.info({ snapshot: plan.id }, 'snapshot: copy finished');
        if (this.runner !== runner) return;
        this.runner = null;
        const next = this.queue.shift();
        if (next !== undefined && this.o.mayStart()) this.request(next);
      },
      (error: unknown) => this.o.fail(error),
    );
  }

  stop(): void {
    this.runner?.stop();
  }

  // ---- the stream, in order ----

  streamStart(xid: number): void {
    this.streamXid = xid;
  }

  streamStop(): void {
    this.streamXid = 0;
  }

  /** An INSERT or DELETE of a captured table. */
  changed(oid: number, tuple: TupleView): void {
    if (this.streamXid !== 0) this.noteStreamed(oid);
    else if (this.runner !== null) this.noteChange(oid, tuple);
  }

  /** An UPDATE of a captured table: its old key (if sent) and its new row. */
  updated(oid: number, before: TupleView | null, after: TupleView): void {
    if (this.streamXid !== 0) this.noteStreamed(oid);
    else if (this.runner !== null) {
      if (before !== null) this.noteChange(oid, before);
      this.noteChange(oid, after, 'update');
    }
  }

  /**
   * A TRUNCATE. A streamed one counts at its transaction's commit, like its other changes (it
   * may still roll back); a decoded one is committed already.
   */
  truncated(oid: number): void {
    if (this.streamXid !== 0) this.noteStreamed(oid);
    else this.tables.get(oid)?.window()?.noteTruncate();
  }

  /** A streamed transaction's changes count now, at its commit: a chunk whose window it committed in is read again. */
  streamCommit(xid: number): void {
    const touched = this.streamTouched.get(xid);
    if (!touched) return;
    this.streamTouched.delete(xid);
    for (const oid of touched) this.tables.get(oid)?.window()?.noteRedo();
  }

  streamAbort(xid: number, subXid: number): void {
    if (subXid === xid) this.streamTouched.delete(xid);
  }

  /**
   * A change of a streamed (in-progress) transaction: the tables it touched are kept whether or
   * not a snapshot runs now, from its first block on (a snapshot may begin while it is open, and
   * it may commit inside one of that snapshot's windows). It counts at its commit, in commit
   * order (streamCommit); its abort forgets it.
   */
  private noteStreamed(oid: number): void {
    let touched = this.streamTouched.get(this.streamXid);
    if (!touched) this.streamTouched.set(this.streamXid, (touched = new Set()));
    touched.add(oid);
  }

  /** A committed change met in the stream to a table being copied: its key, for the open window. */
  private noteChange(oid: number, tuple: TupleView, kind?: 'update'): void {
    const entry = this.tables.get(oid);
    const window = entry?.window();
    if (!window?.isOpen) return;
    const relation = this.o.builder.relationOf(oid);
    if (!relation) return;
    // Compared on the columns the chunks are read by (the primary key, or the unique index
    // that stands in for it), found by name in the stream's shape of the table.
    const texts = entry!.table.keyColumns.map((name) => {
      const i = relation.columns.findIndex((c) => c.name === name);
      return i < 0 || i >= tuple.count || tuple.isNull(i) || tuple.isUnchanged(i)
        ? null
        : tuple.text(i);
    });
    if (texts.some((t) => t === null)) {
      // The tuple does not carry the key (REPLICA IDENTITY USING INDEX on other columns, a key
      // column TOASTed and unchanged): which chunk row it changed is unknown, so the chunk is
      // read again rather than a row kept that the change removed or replaced.
      window.noteRedo();
      return;
    }
    const key = keyOf(texts);
    let partial = false;
    if (kind === 'update')
      for (let i = 0; i < tuple.count && !partial; i++) partial = tuple.isUnchanged(i);
    // An UPDATE without its TOASTed columns does not give the row: it is read again instead.
    if (partial) window.notePartialUpdate(key);
    else window.noteChange(key);
  }

  /**
   * A watermark of the snapshot's chunk in flight. At the high one, the chunk's rows that no
   * change in the window touched become SNAPSHOT events here, in the watermark's transaction, and
   * the chunk's progress is stored with them.
   */
  watermark(content: Uint8Array): void {
    const { builder } = this.o;
    const w = parseWatermark(content);
    if (w !== null) builder.markOwnTransaction();
    const runner = this.runner;
    const found = w === null || runner === null ? null : runner.windowFor(w);
    if (!w || !found || runner === null) return; // not ours, or void (an earlier run's)
    if (w.mark === 'low') {
      found.window.openAt();
      return;
    }
    const rows = found.window.close();
    // Rows to read again keep the table running, their keys recorded, until they are read.
    const reread = runner.closed(w.table, found.window);
    if (found.window.redo) {
      found.handled(); // read again: no rows, no progress
      return;
    }
    const chunk = found.window.progress!;
    const state = reread.length > 0 ? 'running' : chunk.state;
    const progress = {
      ...chunk,
      state,
      pending: reread,
      // The last table's final state finishes the snapshot.
      finished: state !== 'running' && runner.noteTableDone(w.table),
    };
    const entry = [...this.tables.values()].find((e) => e.table.name === w.table);
    if (entry && rows.length > 0) {
      const { oid, relation } = entry.table;
      if (!builder.hasRelation(oid)) builder.relation(relation);
      const current = builder.relationOf(oid)!;
      const names = relation.columns.map((c) => c.name);
      const same =
        current.columns.length === names.length &&
        current.columns.every((c, i) => c.name === names[i]);
      const positions = same ? null : current.columns.map((c) => names.indexOf(c.name));
      builder.snapshotRows(oid, found.rows, rows, positions);
    }
    builder.noteSnapshotProgress({ ...progress, snapshotId: w.snapshot, rows: rows.length });
    // The first chunk records every table of the plan, so that a resume copies those only.
    for (const t of runner.takePlanToRecord()) {
      if (t.schema === progress.schema && t.table === progress.table) continue;
      builder.noteSnapshotProgress({
        snapshotId: w.snapshot,
        schema: t.schema,
        table: t.table,
        state: 'running',
        lastKey: null,
        chunks: 0,
        pending: [],
        rows: 0,
        finished: false,
      });
    }
    found.handled();
  }
}
