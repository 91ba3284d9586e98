/**
 * Copies the rows a source's tables already hold, chunk by chunk, while the reader streams (see
 * window.ts for the watermark algorithm). Up to `parallelTables` tables at a time, each on a
 * connection of its own with the replication session's settings (so that values print as
 * pgoutput prints them), two chunks in memory per table at most: a table's next chunk is read
 * while the stream reaches the previous one's high watermark (see copyChunks). Each query is short
 * and read-only.
 */
import pg from 'pg';
import type { Logger } from '../../src/common/logger.js';
import type { PendingSnapshot, SnapshotTableState } from '../../src/common/protocol.js';
import type { ResolvedRelation } from '../decode/event-rows.js';
import { takeOverMessages } from '../message-framing.js';
import { chunkQuery, rereadQuery, type ChunkTable } from './chunk-query.js';
import { CHUNK_MAX_BYTES, ChunkRows } from './chunk-rows.js';
import {
  keyOf,
  SnapshotWindow,
  splitKey,
  WATERMARK_PREFIX,
  watermarkContent,
  type Watermark,
} from './window.js';

/** SQLSTATE undefined_table: a table dropped while it is being copied. */
const UNDEFINED_TABLE = '42P01';

/** Keys one re-read window reads at most. */
const REREAD_MAX_KEYS = 1000;

/** How long a chunk waits for transactions in progress before the log says so. */
const LONG_WAIT_MS = 10_000;

/** Protocol message type of DataRow. */
const DATA_ROW = 0x44; // 'D'

/** A table being copied: what the stream side needs to note changes and emit rows. */
export interface SnapshotTable {
  readonly oid: number;
  readonly name: string; // schema.table
  readonly relation: ResolvedRelation;
  /** Indexes of the key columns in relation.columns. */
  readonly keyIndexes: readonly number[];
  /** The columns chunks are read by (see chunkKey): what a change's key is compared on. */
  readonly keyColumns: readonly string[];
}

/**
 * The columns a table's chunks are read by: a unique, valid, immediate index on NOT NULL plain
 * columns, preferring the replica identity index (its columns are in every change the stream
 * carries), then the primary key, then the narrowest other one. Null: none, and the table's rows
 * cannot be copied exactly (see docs/snapshots.md). A unique index without a primary key serves an
 * insert-only table (without a replica identity the source refuses UPDATE and DELETE on it).
 */
async function chunkKey(
  c: { query<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<R[]> },
  oid: number,
): Promise<{ columns: string[]; types: string[] } | null> {
  const [row] = await c.query<{ columns: string[]; types: string[] }>(
    `SELECT array_agg(a.attname::text ORDER BY k.ord) AS columns,
            array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) AS types
       FROM pg_index i
       JOIN pg_class r ON r.oid = i.indrelid
      CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
      WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
        AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
      GROUP BY i.indexrelid, i.indisprimary, i.indisreplident, r.relreplident
     HAVING bool_and(a.attnotnull AND a.attgenerated = '')
      ORDER BY (r.relreplident = 'i' AND i.indisreplident) DESC, i.indisprimary DESC, count(*),
               i.indexrelid
      LIMIT 1`,
    [oid],
  );
  return row ?? null;
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
  /** The keys a re-read window reads (see SnapshotWindow.reread); null for a chunk. */
  readonly rereading: ReadonlySet<string> | null;
  /** The stream met the high watermark: out of the table's list at once, then resolved. */
  readonly handled: () => void;
  readonly done: Promise<void>;
}

/** A chunk in flight, with where it started (to read it again from there). */
type InFlightChunk = InFlight & {
  readonly from: { readonly lastKey: readonly string[] | null; readonly chunk: number };
};

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

  /**
   * Waits until every transaction in progress now has ended (see issue()): the snapshot taken
   * now lists them (pg_snapshot_xip), and each has ended once a later snapshot no longer does.
   * Says so in the log if that takes long (a long writing transaction delays each chunk).
   */
  async waitForInProgress(log: Logger, table: string): Promise<void> {
    const [now] = await this.query<{ s: string }>('SELECT pg_current_snapshot()::text AS s');
    const snapshot = now!.s;
    if (!snapshot.includes(',') && /^(\d+):\1:$/.test(snapshot)) return; // none in progress
    const started = Date.now();
    let warned = false;
    for (let pause = 2; ; pause = Math.min(pause * 2, 100)) {
      const [left] = await this.query<{ xids: string[] | null }>(
        `SELECT array_agg(x::text) AS xids FROM pg_snapshot_xip($1::pg_snapshot) x
          WHERE NOT pg_visible_in_snapshot(x, pg_current_snapshot())`,
        [snapshot],
      );
      const xids = left?.xids ?? null;
      if (xids === null || xids.length === 0) return;
      if (!warned && Date.now() - started > LONG_WAIT_MS) {
        warned = true;
        const who = await this.query<{
          pid: number;
          xid: string;
          state: string;
          wait: string | null;
        }>(
          `SELECT pid, backend_xid::text AS xid, state, wait_event AS wait FROM pg_stat_activity
            WHERE backend_xid::text = ANY($1)`,
          [xids],
        );
        log.warn(
          { table, transactions: who, waitingSeconds: Math.round((Date.now() - started) / 1000) },
          'snapshot: a chunk waits for transactions that were in progress at its low watermark to end (a commit PostgreSQL has written but not made visible yet, e.g. one waiting for a synchronous standby, must be in the chunk); long writing transactions delay the copy',
        );
      }
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }

  async end(): Promise<void> {
    await this.client.end().catch(() => undefined);
  }
}

export class SnapshotRunner {
  private stopped = false;
  /**
   * The chunks in flight of each table being copied, in stream order ('' for the empty
   * snapshot's marks): at most two, the second read ahead while the stream reaches the first.
   */
  private readonly inFlight = new Map<string, InFlight[]>();
  /** Keys of each table's rows to read again (see SnapshotWindow.reread), kept in stream order. */
  private readonly rereads = new Map<string, Set<string>>();
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
    if (w.run !== this.o.run || w.snapshot !== this.id) return null; // an earlier run's: void
    return this.inFlight.get(w.table)?.find((c) => c.chunk === w.chunk) ?? null;
  }

  /**
   * The stream closed a window of `table`: the keys still to read again, for its progress (those
   * this window re-read leave, those it could not take join).
   */
  closed(table: string, window: SnapshotWindow): ReadonlyArray<readonly string[]> {
    const entry = this.inFlight.get(table)?.find((c) => c.window === window);
    let keys = this.rereads.get(table);
    if (!keys) this.rereads.set(table, (keys = new Set()));
    if (window.redo) {
      // Read again: so is the chunk read ahead of it, whose rows and progress rest on it. Here,
      // synchronously, before the stream can meet that one's high watermark.
      for (const later of this.inFlight.get(table) ?? []) if (later !== entry) later.window.void();
    } else {
      for (const k of entry?.rereading ?? []) keys.delete(k);
      for (const k of window.reread) keys.add(keyOf(k));
    }
    return [...keys].map(splitKey);
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
    for (const list of this.inFlight.values()) for (const c of [...list]) c.handled();
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
   * Puts a chunk in flight: its low watermark, `read` (which fills its rows and progress), its
   * high watermark. The stream side then meets them (windowFor) and resolves `done`.
   */
  private async issue(
    c: CopyConnection,
    table: string,
    chunk: number,
    rereading: ReadonlySet<string> | null,
    read: (window: SnapshotWindow, rows: ChunkRows) => Promise<void>,
  ): Promise<InFlight> {
    const window = new SnapshotWindow(table, chunk);
    // A re-read window keeps every row it reads: its keys leave the list of keys to read again.
    const rows = new ChunkRows(rereading === null ? CHUNK_MAX_BYTES : Infinity);
    let list = this.inFlight.get(table);
    if (!list) this.inFlight.set(table, (list = []));
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const entry: InFlight = {
      window,
      rows,
      chunk,
      rereading,
      done,
      handled: () => {
        // Synchronously: the stream's next changes belong to the next window, not this one.
        const at = list.indexOf(entry);
        if (at >= 0) list.splice(at, 1);
        resolve();
      },
    };
    list.push(entry);
    const mark = { run: this.o.run, snapshot: this.id, table, chunk };
    try {
      await c.emit({ ...mark, mark: 'low' });
      // Commit order is not visibility order: a transaction whose commit the stream shows before
      // the low watermark may not be visible yet (its commit waits for a synchronous standby, or
      // it is between its WAL record and leaving the proc array), and a chunk read now would
      // miss it while the window does not note it. Every such transaction is in progress in a
      // snapshot taken now; once they have all ended, the chunk sees each of them.
      await c.waitForInProgress(this.o.log, table);
      await read(window, rows);
      await c.emit({ ...mark, mark: 'high' });
    } catch (error) {
      entry.handled();
      throw error;
    }
    return entry;
  }

  /** One chunk, waited for until the stream met its high watermark. */
  private async window(
    c: CopyConnection,
    table: string,
    chunk: number,
    read: (window: SnapshotWindow, rows: ChunkRows) => Promise<void>,
  ): Promise<SnapshotWindow> {
    const entry = await this.issue(c, table, chunk, null, read);
    await entry.done;
    return entry.window;
  }

  /** A snapshot with no table left to copy is finished through one empty watermark pair. */
  private async finishEmpty(c: CopyConnection): Promise<void> {
    await this.window(c, '', 0, async (window) => {
      window.setRows(0, () => '');
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
      window.setRows(0, () => '');
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
    const chosen = await chunkKey(c, t.oid);
    const keyColumns = chosen?.columns ?? [];
    const keyIndexes = keyColumns.map((k) => relation.columns.findIndex((col) => col.name === k));
    const table: SnapshotTable = { oid: t.oid, name, relation, keyIndexes, keyColumns };
    if (chosen === null || keyIndexes.some((i) => i < 0)) {
      log.warn(
        { table: name },
        'snapshot: the table has no primary key and no unique index on NOT NULL columns; its rows are not copied (see docs/snapshots.md, tables without a primary key)',
      );
      await this.emptyChunk(c, t.schema, t.name, state, 'skipped_no_key');
      return;
    }
    const query: ChunkTable = {
      schema: t.schema,
      table: t.name,
      columns: relation.columns.map((col) => col.name),
      primaryKey: keyColumns,
      primaryKeyTypes: chosen.types,
    };
    // Chunks are read one ahead (see copyChunks): at most two in flight.
    const inFlight: InFlightChunk[] = [];
    log.info(
      { table: name, resumeAfter: state?.lastKey ?? null, chunk: state?.chunks ?? 0 },
      'snapshot: copying table',
    );
    hooks.begin(table, () => this.inFlight.get(name)?.[0]?.window ?? null);
    try {
      await this.copyChunks(c, t, query, keyIndexes, state, inFlight);
    } catch (error) {
      if ((error as { code?: unknown }).code !== UNDEFINED_TABLE) throw error;
      // Dropped while it was being copied: what was copied stays, its DROP is in the stream, and
      // the source goes on; the table is recorded as no longer published.
      for (const later of inFlight) await later.done;
      log.warn({ table: name }, 'snapshot: the table was dropped while it was being copied');
      await this.emptyChunk(c, t.schema, t.name, state, 'not_published');
    } finally {
      hooks.end(table);
    }
  }

  /**
   * A table's chunks, read one ahead: the next chunk's query runs while the stream reaches the
   * previous one's high watermark (its low watermark comes after that one's high in the stream,
   * so windows never overlap). `next`: where the next chunk starts; `readAll`: the chunk that
   * reached the table's end is in flight or handled. Rows to read again are read once nothing
   * else of the table is in flight.
   */
  private async copyChunks(
    c: CopyConnection,
    t: { schema: string; name: string },
    query: ChunkTable,
    keyIndexes: readonly number[],
    state: SnapshotTableState | null,
    inFlight: InFlightChunk[],
  ): Promise<void> {
    const { log } = this.o;
    const name = `${t.schema}.${t.name}`;
    let next = { lastKey: state?.lastKey ?? null, chunk: state?.chunks ?? 0 };
    let readAll = false;
    const pending = this.rereads.get(name) ?? new Set<string>();
    this.rereads.set(name, pending);
    for (const k of state?.pending ?? []) pending.add(keyOf(k));
    let rounds = 0;
    while (!this.stopped) {
      if (!readAll && pending.size === 0 && inFlight.length < 2) {
        const from = next;
        let reachedEnd = false;
        const entry = await this.issue(c, name, from.chunk, null, async (w, rows) => {
          await c.rows(chunkQuery(query, from.lastKey, this.o.chunkRows), rows);
          // A chunk cut short at CHUNK_MAX_BYTES ends at its last row kept.
          reachedEnd = rows.count < this.o.chunkRows && !rows.cut;
          const lastKey = rows.count > 0 ? rows.keyTexts(rows.count - 1, keyIndexes) : from.lastKey;
          next = { lastKey, chunk: from.chunk + 1 };
          w.setRows(rows.count, (i) => rows.key(i, keyIndexes));
          w.progress = {
            schema: t.schema,
            table: t.name,
            state: reachedEnd ? 'done' : 'running',
            lastKey,
            chunks: from.chunk + 1,
          };
        });
        readAll = reachedEnd;
        inFlight.push({ ...entry, from });
        continue;
      }
      if (inFlight.length === 0) {
        if (pending.size === 0) return; // readAll: the table is done
        // Rows to read again, once nothing else of the table is in flight.
        if (++rounds % 20 === 0)
          log.warn(
            { table: name, keys: pending.size, rounds },
            'snapshot: rows keep being updated without their TOASTed columns inside their windows; reading them again',
          );
        // A thousand at a time: the rows are whole, however wide.
        const keys = new Set([...pending].slice(0, REREAD_MAX_KEYS));
        const at = next;
        const entry = await this.issue(c, name, at.chunk, keys, async (w, rows) => {
          await c.rows(rereadQuery(query, [...keys].map(splitKey)), rows);
          w.setRows(rows.count, (i) => rows.key(i, keyIndexes));
          w.progress = {
            schema: t.schema,
            table: t.name,
            state: readAll ? 'done' : 'running',
            lastKey: at.lastKey,
            chunks: at.chunk,
          };
        });
        await entry.done;
        continue;
      }
      const first = inFlight.shift()!;
      await first.done;
      if (this.stopped) return;
      if (first.window.redo) {
        // Read again from this chunk on; the one read ahead of it went too (see closed()).
        for (const later of inFlight) await later.done;
        inFlight.length = 0;
        next = first.from;
        readAll = false;
      }
    }
  }
}
