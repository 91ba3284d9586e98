/**
 * Copies the rows a source's tables already hold, chunk by chunk, while the reader streams (see
 * window.ts for the watermark algorithm). One table at a time, one chunk in memory: the chunk
 * loop waits for the stream to meet the chunk's high watermark before it reads the next. Each
 * query is short and read-only, on a connection of its own with the replication session's
 * settings, so that values print as pgoutput prints them.
 */
import pg from 'pg';
import type { Logger } from '../../src/common/logger.js';
import type { PendingSnapshot, SnapshotTableState } from '../../src/common/protocol.js';
import type { ResolvedRelation } from '../decode/event-rows.js';
import { chunkQuery, rereadQuery, type ChunkTable } from './chunk-query.js';
import {
  keyOf,
  SnapshotWindow,
  WATERMARK_PREFIX,
  watermarkContent,
  type ChunkRow,
  type Watermark,
} from './window.js';

/** A table being copied: what the stream side needs to note changes and emit rows. */
export interface SnapshotTable {
  readonly oid: number;
  readonly name: string; // schema.table
  readonly relation: ResolvedRelation;
  /** Indexes of the key columns in relation.columns. */
  readonly keyIndexes: readonly number[];
}

export interface SnapshotHooks {
  /** Resolves a table's relation from the catalog (the reader's CatalogResolver). */
  resolve(oid: number, schema: string, table: string): Promise<ResolvedRelation>;
  /** A table's copy begins: the stream side notes changes to its keys from now on. */
  begin(table: SnapshotTable, window: () => SnapshotWindow | null): void;
  end(table: SnapshotTable): void;
}

export class SnapshotRunner {
  private client: pg.Client | null = null;
  private stopped = false;
  /** The window of the chunk in flight, and what happens once the stream meets its high mark. */
  private current: {
    window: SnapshotWindow;
    watermark: Omit<Watermark, 'mark'>;
    handled: () => void;
  } | null = null;

  constructor(
    private readonly options: pg.ClientConfig,
    private readonly publication: string,
    /** 'schema.table' of tables never captured (the buffer's own, in the same database). */
    private readonly skipped: ReadonlySet<string>,
    private readonly snapshot: PendingSnapshot,
    private readonly run: string,
    private readonly chunkRows: number,
    private readonly hooks: SnapshotHooks,
    private readonly log: Logger,
  ) {}

  /** The chunk whose watermarks the stream may meet now, if any. */
  windowFor(w: Watermark): { window: SnapshotWindow; handled: () => void } | null {
    const c = this.current;
    if (
      c === null ||
      w.run !== this.run ||
      w.snapshot !== c.watermark.snapshot ||
      w.table !== c.watermark.table ||
      w.chunk !== c.watermark.chunk
    ) {
      return null; // an earlier run's, or another chunk's: void
    }
    return { window: c.window, handled: c.handled };
  }

  async runAll(): Promise<void> {
    this.client = new pg.Client(this.options);
    this.client.on('error', () => undefined); // surfaced by the failing query
    await this.client.connect();
    try {
      const tables = await this.client.query<{ oid: number; schema: string; name: string }>(
        `SELECT c.oid::int AS oid, p.schemaname AS schema, p.tablename AS name
           FROM pg_publication_tables p
           JOIN pg_class c ON c.relname = p.tablename
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = p.schemaname
          WHERE p.pubname = $1 ORDER BY 2, 3`,
        [this.publication],
      );
      const progress = new Map(this.snapshot.tables.map((t) => [`${t.schema}.${t.table}`, t]));
      // The tables are those of the publication when the snapshot began: recorded with its first
      // chunk, and on a resume taken from that record (a table created since is the stream's).
      const planned = tables.rows.filter(
        (t) =>
          !this.skipped.has(`${t.schema}.${t.name}`) &&
          (this.snapshot.tables.length === 0 || progress.has(`${t.schema}.${t.name}`)),
      );
      this.plan = planned.map((t) => ({ schema: t.schema, table: t.name }));
      const todo = planned.filter(
        (t) => (progress.get(`${t.schema}.${t.name}`)?.state ?? 'running') === 'running',
      );
      // Tables asked for by name that the publication does not have: said, and recorded so.
      const published = new Set(tables.rows.map((t) => `${t.schema}.${t.name}`));
      const unknown = this.snapshot.tables.filter(
        (t) => t.state === 'running' && !published.has(`${t.schema}.${t.table}`),
      );
      for (const [i, t] of unknown.entries()) {
        this.log.warn(
          { snapshot: this.snapshot.id, table: `${t.schema}.${t.table}` },
          `snapshot: the table is not in publication "${this.publication}"; it is not copied`,
        );
        await this.emptyChunk(
          t.schema,
          t.table,
          t,
          'not_published',
          todo.length === 0 && i === unknown.length - 1,
        );
      }
      if (todo.length === 0) {
        if (unknown.length === 0) await this.finishEmpty();
        return;
      }
      for (const [i, t] of todo.entries()) {
        if (this.stopped) return;
        await this.copyTable(
          t,
          progress.get(`${t.schema}.${t.name}`) ?? null,
          i === todo.length - 1,
        );
      }
      if (todo.length === 0)
        this.log.info({ snapshot: this.snapshot.id }, 'snapshot has nothing left to copy');
    } finally {
      await this.client.end().catch(() => undefined);
      this.client = null;
    }
  }

  /** The snapshot's tables, once listed: the first chunk's progress records them all. */
  private plan: ReadonlyArray<{ schema: string; table: string }> = [];
  private planRecorded = false;

  get id(): number {
    return this.snapshot.id;
  }

  /**
   * The tables to record with the first chunk's progress (once; none if the snapshot came with
   * its tables listed), so that a resume copies those only.
   */
  takePlanToRecord(): ReadonlyArray<{ schema: string; table: string }> {
    if (this.planRecorded || this.snapshot.tables.length > 0) return [];
    this.planRecorded = true;
    return this.plan;
  }

  /** A snapshot with no table left to copy is finished through one empty watermark pair. */
  private async finishEmpty(): Promise<void> {
    const window = new SnapshotWindow('', 0);
    const mark = { run: this.run, snapshot: this.snapshot.id, table: '', chunk: 0 };
    const handled = new Promise<void>((resolve) => {
      this.current = { window, watermark: mark, handled: resolve };
    });
    window.setRows([]);
    window.progress = {
      schema: '',
      table: '',
      state: 'done',
      lastKey: null,
      chunks: 0,
      finished: true,
    };
    await this.emit({ ...mark, mark: 'low' });
    await this.emit({ ...mark, mark: 'high' });
    await handled;
    this.current = null;
  }

  stop(): void {
    this.stopped = true;
    this.current?.handled();
  }

  private async copyTable(
    t: { oid: number; schema: string; name: string },
    state: SnapshotTableState | null,
    last: boolean,
  ): Promise<void> {
    const client = this.client!;
    const relation = await this.hooks.resolve(t.oid, t.schema, t.name);
    const name = `${t.schema}.${t.name}`;
    const keyIndexes = relation.primaryKey.map((k) =>
      relation.columns.findIndex((c) => c.name === k),
    );
    const table: SnapshotTable = { oid: t.oid, name, relation, keyIndexes };
    const keyTypes = await client.query<{ t: string }>(
      `SELECT format_type(a.atttypid, a.atttypmod) AS t
         FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord`,
      [t.oid],
    );
    if (keyTypes.rows.length === 0 || keyIndexes.some((i) => i < 0)) {
      this.log.warn(
        { table: name },
        'snapshot: the table has no primary key; its rows are not copied',
      );
      await this.emptyChunk(t.schema, t.name, state, 'skipped_no_key', last);
      return;
    }
    const query: ChunkTable = {
      schema: t.schema,
      table: t.name,
      columns: relation.columns.map((c) => c.name),
      primaryKey: relation.primaryKey,
      primaryKeyTypes: keyTypes.rows.map((r) => r.t),
    };
    let lastKey = state?.lastKey ?? null;
    let chunk = state?.chunks ?? 0;
    // Keys to read again (see SnapshotWindow.reread); `exhausted`: the last chunk was read.
    let pending = state?.pending ?? [];
    let exhausted = false;
    let rereads = 0;
    this.log.info({ table: name, resumeAfter: lastKey, chunk }, 'snapshot: copying table');
    this.hooks.begin(table, () => this.current?.window ?? null);
    try {
      for (;;) {
        if (this.stopped) return;
        const reread = pending.length > 0;
        const window = new SnapshotWindow(name, chunk);
        const mark = { run: this.run, snapshot: this.snapshot.id, table: name, chunk };
        const handled = new Promise<void>((resolve) => {
          this.current = { window, watermark: mark, handled: resolve };
        });
        await this.emit({ ...mark, mark: 'low' });
        const q = reread ? rereadQuery(query, pending) : chunkQuery(query, lastKey, this.chunkRows);
        const result = await client.query<string[]>({
          text: q.text,
          values: q.values,
          rowMode: 'array',
        });
        const k = query.primaryKey.length;
        const rows: ChunkRow[] = result.rows.map((r) => ({
          key: keyOf(r.slice(0, k)),
          values: r.slice(k),
        }));
        const done: boolean = exhausted || (!reread && rows.length < this.chunkRows);
        const nextKey =
          !reread && rows.length > 0 ? result.rows[result.rows.length - 1]!.slice(0, k) : lastKey;
        window.setRows(rows);
        window.progress = {
          schema: t.schema,
          table: t.name,
          state: done ? 'done' : 'running',
          lastKey: nextKey,
          chunks: reread ? chunk : chunk + 1,
          finished: done && last,
        };
        await this.emit({ ...mark, mark: 'high' });
        await handled;
        this.current = null;
        if (window.redo) continue; // the same chunk again (see SnapshotWindow.noteRedo)
        pending = window.reread;
        if (!reread) {
          lastKey = nextKey;
          chunk++;
          exhausted = done;
        }
        if (pending.length > 0) {
          rereads++;
          if (rereads % 20 === 0)
            this.log.warn(
              { table: name, keys: pending.length, rounds: rereads },
              'snapshot: rows keep being updated without their TOASTed columns inside their windows; reading them again',
            );
        } else if (done) return;
      }
    } finally {
      this.hooks.end(table);
    }
  }

  /** A table with nothing to copy still records its state, through one empty chunk. */
  private async emptyChunk(
    schema: string,
    name: string,
    state: SnapshotTableState | null,
    outcome: 'skipped_no_key' | 'not_published',
    last: boolean,
  ): Promise<void> {
    const chunk = state?.chunks ?? 0;
    const window = new SnapshotWindow(`${schema}.${name}`, chunk);
    const mark = { run: this.run, snapshot: this.snapshot.id, table: `${schema}.${name}`, chunk };
    const handled = new Promise<void>((resolve) => {
      this.current = { window, watermark: mark, handled: resolve };
    });
    window.setRows([]);
    window.progress = {
      schema,
      table: name,
      state: outcome,
      lastKey: null,
      chunks: chunk,
      finished: last,
    };
    await this.emit({ ...mark, mark: 'low' });
    await this.emit({ ...mark, mark: 'high' });
    await handled;
    this.current = null;
  }

  private async emit(w: Watermark): Promise<void> {
    await this.client!.query('SELECT pg_logical_emit_message(true, $1, $2)', [
      WATERMARK_PREFIX,
      watermarkContent(w),
    ]);
  }
}
