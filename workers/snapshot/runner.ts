/**
 * Copies the rows a source's tables already hold, chunk by chunk, while the reader streams (see
 * window.ts for the watermark algorithm). Up to `parallelTables` tables at a time, each on a
 * connection of its own with the replication session's settings (so that values print as
 * pgoutput prints them), one chunk in memory per table: a table's chunk loop waits for the stream
 * to meet the chunk's high watermark before it reads the next. Each query is short and read-only.
 */
import pg from 'pg';
import type { Logger } from '../../src/common/logger.js';
import type { PendingSnapshot, SnapshotTableState } from '../../src/common/protocol.js';
import type { ResolvedRelation } from '../decode/event-rows.js';
import { takeOverMessages } from '../message-framing.js';
import { chunkQuery, rereadQuery, type ChunkTable } from './chunk-query.js';
import { ChunkRows } from './chunk-rows.js';
import { SnapshotWindow, WATERMARK_PREFIX, watermarkContent, type Watermark } from './window.js';

/** Protocol message type of DataRow. */
const DATA_ROW = 0x44; // 'D'

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

export interface SnapshotRunnerOptions {
  /** The copy connections' options (the replication session's settings). */
  readonly connection: pg.ClientConfig;
  readonly publication: string;
  /** 'schema.table' of tables never captured (the buffer's own, in the same database). */
  readonly skipped: ReadonlySet<string>;
  readonly snapshot: PendingSnapshot;
  /** This reader run's id: watermarks of an earlier run are void. */
  readonly run: string;
  readonly chunkRows: number;
  readonly parallelTables: number;
  readonly hooks: SnapshotHooks;
  readonly log: Logger;
}

/** A chunk in flight: its window, its rows, and what happens once the stream meets its high mark. */
interface InFlight {
  readonly window: SnapshotWindow;
  readonly rows: ChunkRows;
  readonly chunk: number;
  readonly handled: () => void;
}

/** One copy connection: chunk queries whose DataRows come to us as bytes, and watermarks. */
class CopyConnection {
  private readonly client: pg.Client;
  private collecting: ChunkRows | null = null;

  constructor(options: pg.ClientConfig) {
    this.client = new pg.Client(options);
    this.client.on('error', () => undefined); // surfaced by the failing query
  }

  async connect(): Promise<void> {
    await this.client.connect();
    const connection = (this.client as unknown as { connection: NodeJS.EventEmitter }).connection;
    if (
      !takeOverMessages(
        connection,
        (type) => type === DATA_ROW && this.collecting !== null,
        (_type, body) => this.collecting!.add(body),
      )
    )
      throw new Error('snapshot: cannot read the chunk rows (pg connection internals changed)');
  }

  query<R extends pg.QueryResultRow>(text: string, values: unknown[] = []): Promise<R[]> {
    return this.client.query<R>(text, values).then((r) => r.rows);
  }

  /** Runs a chunk query; its rows go into `rows`. */
  async rows(q: { text: string; values: unknown[] }, rows: ChunkRows): Promise<void> {
    this.collecting = rows;
    try {
      await this.client.query(q);
    } finally {
      this.collecting = null;
    }
  }

  async emit(w: Watermark): Promise<void> {
    await this.client.query('SELECT pg_logical_emit_message(true, $1, $2)', [
      WATERMARK_PREFIX,
      watermarkContent(w),
    ]);
  }

  async end(): Promise<void> {
    await this.client.end().catch(() => undefined);
  }
}

export class SnapshotRunner {
  private stopped = false;
  /** The chunk in flight of each table being copied ('' for the empty snapshot's marks). */
  private readonly inFlight = new Map<string, InFlight>();
  /** Tables whose final state the stream has not met yet: the snapshot ends when none is left. */
  private readonly remaining = new Set<string>();
  private readonly connections: CopyConnection[] = [];
  /** The snapshot's tables, once listed: the first chunk's progress records them all. */
  private plan: ReadonlyArray<{ schema: string; table: string }> = [];
  private planRecorded = false;

  constructor(private readonly o: SnapshotRunnerOptions) {}

  get id(): number {
    return this.o.snapshot.id;
  }

  /** The chunk whose watermarks the stream may meet now, if any. */
  windowFor(w: Watermark): { window: SnapshotWindow; rows: ChunkRows; handled: () => void } | null {
    const c = this.inFlight.get(w.table);
    if (c === undefined || w.run !== this.o.run || w.snapshot !== this.id || w.chunk !== c.chunk)
      return null; // an earlier run's, or another chunk's: void
    return c;
  }

  /**
   * The stream met a table's final state (done or skipped): true when it was the last table, so
   * that this progress finishes the snapshot.
   */
  noteTableDone(table: string): boolean {
    this.remaining.delete(table);
    return this.remaining.size === 0;
  }

  /**
   * The tables to record with the first chunk's progress (once; none if the snapshot came with
   * its tables listed), so that a resume copies those only.
   */
  takePlanToRecord(): ReadonlyArray<{ schema: string; table: string }> {
    if (this.planRecorded || this.o.snapshot.tables.length > 0) return [];
    this.planRecorded = true;
    return this.plan;
  }

  stop(): void {
    this.stopped = true;
    for (const c of this.inFlight.values()) c.handled();
  }

  async runAll(): Promise<void> {
    const { snapshot, publication, log } = this.o;
    try {
      const first = await this.connect();
      const tables = await first.query<{ oid: number; schema: string; name: string }>(
        `SELECT c.oid::int AS oid, p.schemaname AS schema, p.tablename AS name
           FROM pg_publication_tables p
           JOIN pg_class c ON c.relname = p.tablename
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = p.schemaname
          WHERE p.pubname = $1 ORDER BY 2, 3`,
        [publication],
      );
      const progress = new Map(snapshot.tables.map((t) => [`${t.schema}.${t.table}`, t]));
      // The tables are those of the publication when the snapshot began: recorded with its first
      // chunk, and on a resume taken from that record (a table created since is the stream's).
      const planned = tables.filter(
        (t) =>
          !this.o.skipped.has(`${t.schema}.${t.name}`) &&
          (snapshot.tables.length === 0 || progress.has(`${t.schema}.${t.name}`)),
      );
      this.plan = planned.map((t) => ({ schema: t.schema, table: t.name }));
      const todo = planned.filter(
        (t) => (progress.get(`${t.schema}.${t.name}`)?.state ?? 'running') === 'running',
      );
      // Tables asked for by name that the publication does not have: said, and recorded so.
      const published = new Set(tables.map((t) => `${t.schema}.${t.name}`));
      const unknown = snapshot.tables.filter(
        (t) => t.state === 'running' && !published.has(`${t.schema}.${t.table}`),
      );
      const work: Array<(c: CopyConnection) => Promise<void>> = [];
      for (const t of unknown) {
        this.remaining.add(`${t.schema}.${t.table}`);
        work.push(async (c) => {
          log.warn(
            { snapshot: this.id, table: `${t.schema}.${t.table}` },
            `snapshot: the table is not in publication "${publication}"; it is not copied`,
          );
          await this.emptyChunk(c, t.schema, t.table, t, 'not_published');
        });
      }
      for (const t of todo) {
        this.remaining.add(`${t.schema}.${t.name}`);
        work.push((c) => this.copyTable(c, t, progress.get(`${t.schema}.${t.name}`) ?? null));
      }
      if (work.length === 0) {
        log.info({ snapshot: this.id }, 'snapshot: nothing left to copy');
        await this.finishEmpty(first);
        return;
      }
      const workers = Math.min(this.o.parallelTables, work.length);
      await Promise.all(
        Array.from({ length: workers }, async (_, i) => {
          const c = i === 0 ? first : await this.connect();
          for (let job = work.shift(); job !== undefined && !this.stopped; job = work.shift())
            await job(c);
        }),
      );
    } finally {
      await Promise.all(this.connections.map((c) => c.end()));
    }
  }

  private async connect(): Promise<CopyConnection> {
    const c = new CopyConnection(this.o.connection);
    this.connections.push(c);
    await c.connect();
    return c;
  }

  /**
   * One watermark pair around `read` (which fills the chunk's rows and progress), then waits for
   * the stream to meet the high one.
   */
  private async window(
    c: CopyConnection,
    table: string,
    chunk: number,
    read: (window: SnapshotWindow, rows: ChunkRows) => Promise<void>,
  ): Promise<SnapshotWindow> {
    const window = new SnapshotWindow(table, chunk);
    const rows = new ChunkRows();
    const handled = new Promise<void>((resolve) => {
      this.inFlight.set(table, { window, rows, chunk, handled: resolve });
    });
    const mark = { run: this.o.run, snapshot: this.id, table, chunk };
    try {
      await c.emit({ ...mark, mark: 'low' });
      await read(window, rows);
      await c.emit({ ...mark, mark: 'high' });
      await handled;
    } finally {
      this.inFlight.delete(table);
    }
    return window;
  }

  /** A snapshot with no table left to copy is finished through one empty watermark pair. */
  private async finishEmpty(c: CopyConnection): Promise<void> {
    await this.window(c, '', 0, async (window) => {
      window.setRows([]);
      window.progress = { schema: '', table: '', state: 'done', lastKey: null, chunks: 0 };
    });
  }

  /** A table with nothing to copy still records its state, through one empty chunk. */
  private async emptyChunk(
    c: CopyConnection,
    schema: string,
    name: string,
    state: SnapshotTableState | null,
    outcome: 'skipped_no_key' | 'not_published',
  ): Promise<void> {
    const chunks = state?.chunks ?? 0;
    await this.window(c, `${schema}.${name}`, chunks, async (window) => {
      window.setRows([]);
      window.progress = { schema, table: name, state: outcome, lastKey: null, chunks };
    });
  }

  private async copyTable(
    c: CopyConnection,
    t: { oid: number; schema: string; name: string },
    state: SnapshotTableState | null,
  ): Promise<void> {
    const { log, hooks } = this.o;
    const relation = await hooks.resolve(t.oid, t.schema, t.name);
    const name = `${t.schema}.${t.name}`;
    const keyIndexes = relation.primaryKey.map((k) =>
      relation.columns.findIndex((col) => col.name === k),
    );
    const table: SnapshotTable = { oid: t.oid, name, relation, keyIndexes };
    const keyTypes = await c.query<{ t: string }>(
      `SELECT format_type(a.atttypid, a.atttypmod) AS t
         FROM pg_index i CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord`,
      [t.oid],
    );
    if (keyTypes.length === 0 || keyIndexes.some((i) => i < 0)) {
      log.warn({ table: name }, 'snapshot: the table has no primary key; its rows are not copied');
      await this.emptyChunk(c, t.schema, t.name, state, 'skipped_no_key');
      return;
    }
    const query: ChunkTable = {
      schema: t.schema,
      table: t.name,
      columns: relation.columns.map((col) => col.name),
      primaryKey: relation.primaryKey,
      primaryKeyTypes: keyTypes.map((r) => r.t),
    };
    let lastKey = state?.lastKey ?? null;
    let chunk = state?.chunks ?? 0;
    // Keys to read again (see SnapshotWindow.reread); `exhausted`: the last chunk was read.
    let pending = state?.pending ?? [];
    let exhausted = false;
    let rereads = 0;
    log.info({ table: name, resumeAfter: lastKey, chunk }, 'snapshot: copying table');
    hooks.begin(table, () => this.inFlight.get(name)?.window ?? null);
    try {
      while (!this.stopped) {
        const reread = pending.length > 0;
        let done: boolean = exhausted;
        let nextKey = lastKey;
        const window = await this.window(c, name, chunk, async (w, rows) => {
          const q = reread
            ? rereadQuery(query, pending)
            : chunkQuery(query, lastKey, this.o.chunkRows);
          await c.rows(q, rows);
          if (!reread) {
            done = rows.count < this.o.chunkRows;
            if (rows.count > 0) nextKey = rows.keyTexts(rows.count - 1, keyIndexes);
          }
          w.setRows(rows.keys(keyIndexes));
          w.progress = {
            schema: t.schema,
            table: t.name,
            state: done ? 'done' : 'running',
            lastKey: nextKey,
            chunks: reread ? chunk : chunk + 1,
          };
        });
        if (this.stopped) return;
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
            log.warn(
              { table: name, keys: pending.length, rounds: rereads },
              'snapshot: rows keep being updated without their TOASTed columns inside their windows; reading them again',
            );
        } else if (done) return;
      }
    } finally {
      hooks.end(table);
    }
  }
}
