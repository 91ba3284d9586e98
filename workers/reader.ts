/**
 * The reader: streams one replication slot, decodes it into batches for the supervisor, and
 * confirms positions to the source by the rule in confirmations.ts. Its parts: the replication
 * connection (replication-stream.ts), the source's setup and catalog (source-setup.ts), the
 * decoder (decode/), the rule (confirmations.ts); this file holds the flow between them —
 * stream order, blocking for catalog lookups and for room in flight, batching — and the
 * lifecycle (start, stop, fail, close).
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { pgClientOptions } from '../src/common/pg-connection.js';
import {
  describeConnectionError,
  FatalSourceError,
  ReaderAbortedError,
  SourceTimeoutError,
  toErrorInfo,
} from '../src/common/errors.js';
import {
  BUFFER_TABLES,
  DATABASE_IDENTITY_SQL,
  type DatabaseIdentity,
} from '../src/common/database-identity.js';
import {
  DDL_MESSAGE_PREFIX,
  ddlTriggerCurrent,
  readDdlTriggerState,
} from '../src/common/ddl-capture.js';
import { createLogger, safeConnection, type Logger } from '../src/common/logger.js';
import { formatLsn, parseLsn } from '../src/common/lsn.js';
import {
  batchTransferList,
  type PendingSnapshot,
  type ReaderMessage,
  type ReaderResult,
  type ReaderTask,
  type SupervisorMessage,
} from '../src/common/protocol.js';
import {
  currentWalLsn,
  findGap,
  gapError,
  readSlotDecodingStats,
  readSlotState,
  retainedWalBytes,
  where,
} from '../src/common/source-admin.js';
import { fullXid, readNextXid, type SourceIdentity } from '../src/common/source-history.js';
import { Confirmations } from './confirmations.js';
import { BatchBuilder } from './decode/event-rows.js';
import {
  PgoutputDecoder,
  PG_EPOCH_OFFSET_US,
  type PgoutputHandler,
  type PgoutputMessage,
  type TupleView,
} from './decode/pgoutput.js';
import {
  dropClientSocket,
  KEEPALIVE,
  REPLICATION_SESSION_OPTIONS,
  ReplicationStream,
  XLOG_DATA,
  XLOG_DATA_HEADER,
  type SourceNotice,
} from './replication-stream.js';
import { explainSourceError, noticeGapError } from './source-errors.js';
import { SnapshotRunner, type SnapshotTable } from './snapshot/runner.js';
import { keyOf, parseWatermark, WATERMARK_PREFIX, type SnapshotWindow } from './snapshot/window.js';
import { CatalogResolver, prepareSource, type DdlGap } from './source-setup.js';

/** Keeps the walsender from timing out while we are paused (its default timeout is 60 s). */
const STATUS_INTERVAL_MS = 5_000;
/** How often the reader reports positions to the supervisor for metrics. */
const PROGRESS_INTERVAL_MS = 1_000;
/** How often the slot's WAL retention is read from the source (one cheap query). */
const SLOT_POLL_INTERVAL_MS = 15_000;
/** How long a stop waits for the server to take the final confirmation. */
const FINAL_CONFIRM_TIMEOUT_MS = 5_000;
/** How long closing may wait for the source to acknowledge the end of our connections. */
const CLOSE_TIMEOUT_MS = 3_000;

export class SlotReader implements PgoutputHandler {
  private readonly log: Logger;
  private readonly builder: BatchBuilder;
  private readonly decoder = new PgoutputDecoder();
  private side: pg.Client | null = null;
  private stream: ReplicationStream | null = null;
  private resolver: CatalogResolver | null = null;

  /** 'schema.table' of tables never captured (the buffer's own, when source and buffer coincide). */
  private readonly skippedTables = new Set<string>();
  private readonly skippedRelations = new Set<number>();
  /** Messages read while blocked, handled in order once the block ends. */
  private readonly queue: Buffer[] = [];
  /** Why reading is paused, if it is. */
  private blocked: 'catalog' | 'slot' | 'buffer' | null = null;
  private blockedWork: Promise<void> | null = null;
  private serverVersion = 0;
  /** The snapshot copying existing rows alongside the stream, and the tables it is on now. */
  private snapshot: SnapshotRunner | null = null;
  /** Tables being copied that each open streamed transaction changed (see onStreamCommit). */
  private readonly streamTouched = new Map<number, Set<number>>();
  /** Snapshots asked for while one runs; the copy connection's options once streaming. */
  private readonly snapshotQueue: PendingSnapshot[] = [];
  private snapshotOptions: pg.ClientConfig | null = null;
  private snapshotsSupported = false;
  private streamXid = 0;
  private readonly snapshotTables = new Map<
    number,
    { table: SnapshotTable; window: () => SnapshotWindow | null }
  >();
  /** Where the DDL capture trigger was last found in place (ddl: true). */
  private ddlVerifiedLsn: bigint | null = null;
  /** A recent 64-bit xid of the server: stored checkpoint xids are made 64-bit with it. */
  private xidReference = 0n;
  /** Where this run started streaming: the checkpoint, or where a new capture begins. */
  private startLsn = 0n;
  /** Positions: durable, recorded, confirmed, idle (replaced once the start is known). */
  private confirmations = new Confirmations(0n, 0n);
  private recordWaiters: Array<{ lsn: bigint; resolve: () => void }> = [];
  private replyRequested = false;
  private lastHeardAt = Date.now();
  /** Counts every message from the source; the silence check compares it, not the clock. */
  private received = 0;
  private receivedAtLastCheck = 0;

  /** Cancels the pending batch's scheduled send, if one is scheduled. */
  private cancelScheduledFlush: (() => void) | null = null;
  private creditWaiters: Array<() => void> = [];
  private readonly messagePrefixes: ReadonlySet<string>;
  /** The supervisor's writes are behind across all sources: send nothing more for now. */
  private held = false;
  private durableWaiters: Array<() => void> = [];
  private timers: NodeJS.Timeout[] = [];

  private stopping = false;
  private failed: unknown = null;
  private settle!: { resolve: () => void; reject: (e: unknown) => void };
  private readonly finished: Promise<void>;

  constructor(private readonly task: ReaderTask) {
    this.log = createLogger(task.settings.logLevel, {
      source: task.source.id,
      slot: task.source.slot,
      thread: 'reader',
    });
    this.builder = new BatchBuilder(task.source.id, task.settings.batchMaxBytes);
    this.messagePrefixes = new Set(task.source.messages);
    this.finished = new Promise<void>((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    // Always handled: run() awaits it; this keeps an early rejection from being "unhandled".
    this.finished.catch(() => undefined);
  }

  async run(): Promise<ReaderResult> {
    const { source, port } = this.task;
    port.on('message', (message: SupervisorMessage) => this.onSupervisorMessage(message));
    try {
      const options = pgClientOptions(source.connection, `philotes:${source.id}`);
      this.side = new pg.Client(options);
      this.side.on('error', (error) => this.fail(error));
      const { host, port: sourcePort } = source.connection;
      await this.side
        .connect()
        .catch((error: unknown) =>
          Promise.reject(describeConnectionError(error, 'source', host, sourcePort)),
        );
      this.log.info({ connection: safeConnection(source.connection) }, 'connected to source');
      const checkpoint = this.task.checkpoint;
      const prepared = await prepareSource(
        this.side,
        options,
        source,
        this.log,
        checkpoint === null
          ? null
          : {
              checkpointLsn: parseLsn(checkpoint.lsn),
              confirmedLsn:
                checkpoint.confirmedLsn === null ? null : parseLsn(checkpoint.confirmedLsn),
              checkpointXid: checkpoint.transactionId,
              identity: checkpoint.identity,
            },
      );
      const identity = await this.side.query<DatabaseIdentity>(DATABASE_IDENTITY_SQL);
      if (identity.rows[0]?.identity === this.task.buffer.identity) {
        // Capturing the buffer's own tables would feed every stored event back in as a change.
        for (const table of BUFFER_TABLES)
          this.skippedTables.add(`${this.task.buffer.schema}.${table}`);
        this.log.info(
          { tables: [...this.skippedTables] },
          'the source database is also the buffer: Philotes leaves its own tables out',
        );
      }
      this.resolver = new CatalogResolver(this.side, this.log);

      this.startLsn = prepared.startLsn;
      this.serverVersion = prepared.serverVersion;
      this.xidReference = prepared.nextXid;
      // Nothing recorded yet (a source new to the buffer): its start is recorded below.
      this.confirmations = new Confirmations(
        prepared.startLsn,
        prepared.mustRecord ? 0n : prepared.recordedLsn,
      );
      // The start, and the server's identity, are in the buffer before the slot streams to us:
      // every later start can then tell a slot moved by someone else, or another history.
      await this.recordWith(prepared.recordedLsn, {
        identity: prepared.identity,
        ddlGap: prepared.ddlGap,
      });
      if (this.failed !== null) throw this.failed;
      const start = formatLsn(prepared.startLsn);
      this.stream = new ReplicationStream(
        options,
        source.publication,
        {
          copyData: (chunk, owned) => this.onCopyData(chunk, owned),
          notice: (notice) => this.onNotice(notice),
          error: (error) => this.fail(error),
          // The server accepted START_REPLICATION and this connection now holds the slot. Check
          // the slot once more before handling anything, and only then count as streaming (a
          // slot held by another client never gets this far).
          started: () =>
            this.block('slot', async () => {
              await this.verifySlot();
              this.log.info({ startLsn: start, protocol: prepared.protocol }, 'streaming started');
              void this.reportSlot();
              // Watermarks carry no data: their commits need not wait for synchronous standbys
              // (a slow or missing one would stall the copy, not protect anything).
              this.snapshotOptions = {
                ...options,
                options: `${REPLICATION_SESSION_OPTIONS} -c synchronous_commit=local`,
              };
              this.snapshotsSupported = prepared.serverVersion >= 140000;
              if (this.task.snapshot !== null) this.startSnapshot(this.task.snapshot);
              this.post({
                type: 'ready',
                startLsn: start,
                slotCreated: prepared.slotCreated,
                publicationCreated: prepared.publicationCreated,
                serverVersion: prepared.serverVersion,
              });
            }),
        },
        {
          protocol: prepared.protocol,
          // Snapshot watermarks are logical messages: on wherever the server has them (14+),
          // so that a snapshot asked for later finds them on.
          messages: source.messages.length > 0 || source.ddl || prepared.serverVersion >= 140000,
        },
      );

      this.timers.push(
        setInterval(() => this.confirm(false), this.task.settings.checkpointIntervalMs),
        setInterval(
          () => {
            this.checkSourceSilence();
            // Ask for a reply: the server's keepalive answers prove the connection is alive.
            this.sendStatus(true);
          },
          Math.min(STATUS_INTERVAL_MS, this.task.settings.checkpointIntervalMs),
        ),
        // Positions for the lag metrics whether or not anything was confirmed: a stalled buffer
        // must show as growing lag.
        setInterval(() => this.reportProgress(), PROGRESS_INTERVAL_MS),
        // The most reported CDC incident is a slot quietly filling the source's disk.
        setInterval(() => void this.reportSlot(), SLOT_POLL_INTERVAL_MS),
      );

      this.stream.start(source.slot, prepared.startLsn).then(
        () => {
          if (!this.stopping) this.fail(new Error('replication stream ended unexpectedly'));
        },
        (error: unknown) => this.fail(describeConnectionError(error, 'source', host, sourcePort)),
      );
      await this.finished;
      return { confirmedLsn: formatLsn(this.confirmations.confirmed), error: null };
    } catch (error) {
      this.fail(error);
      return {
        confirmedLsn: formatLsn(this.confirmations.confirmed),
        error: toErrorInfo(this.failed),
      };
    } finally {
      await this.close();
      port.close();
    }
  }

  // ---- stream ----

  /**
   * Called synchronously for every CopyData message of the stream, in order. Most are decoded on
   * the spot. One that needs async work — a relation's catalog lookup, or waiting for room in
   * flight — pauses the socket; the messages already read behind it wait in `queue`, copied
   * because pg reuses its read buffer. Keepalives wait in line too: the idle check they make
   * holds only once everything before them is handled.
   */
  private onCopyData(chunk: Buffer, owned: boolean): void {
    this.received++;
    if (this.failed !== null) return; // dropped: never stored, never confirmed
    if (this.stopping) {
      this.pauseStream(); // dropped too; see stop()
      return;
    }
    if (this.blocked !== null || this.queue.length > 0) {
      this.queue.push(owned ? chunk : Buffer.from(chunk)); // either way, its own memory now
      return;
    }
    this.handle(chunk, owned);
  }

  /**
   * The check prepareSource made before streaming, once more now that this connection holds the
   * slot and nobody else can move it: another client could have streamed it in between. Nothing
   * of the stream is handled before this passes (the stream is blocked while it runs).
   */
  private async verifySlot(): Promise<void> {
    const { source } = this.task;
    const slot = await readSlotState(this.side!, source.slot);
    const record = { checkpointLsn: this.startLsn, confirmedLsn: this.confirmations.recordedUpTo };
    const gap = findGap(record, slot, await currentWalLsn(this.side!));
    if (gap !== null) throw gapError(source, gap, slot, this.startLsn);
  }

  private handle(chunk: Buffer, owned: boolean): void {
    try {
      if (chunk[0] === XLOG_DATA) {
        this.decoder.decode(chunk, XLOG_DATA_HEADER, this, owned);
        if (this.blocked !== null) return;
        const b = this.builder;
        if (
          b.rows >= this.task.settings.batchMaxRows ||
          b.bytes >= this.task.settings.batchMaxBytes
        )
          this.flush();
        else this.scheduleFlush();
      } else if (chunk[0] === KEEPALIVE) {
        const walEnd = chunk.readBigUInt64BE(1);
        this.onKeepalive(walEnd, chunk[17] === 1);
      } else {
        // Never skipped silently: positions after it would be confirmed as if it held nothing.
        throw new Error(`replication stream: unexpected message type 0x${chunk[0]?.toString(16)}`);
      }
    } catch (error) {
      this.fail(error);
    }
  }

  // ---- PgoutputHandler: called by the decoder, synchronously, per message ----

  begin(finalLsn: number, commitTime: number, xid: number): void {
    this.builder.begin(finalLsn, commitTime, xid);
  }

  commit(_commitLsn: number, endLsn: number, commitTime: number): void {
    this.builder.commit(endLsn, commitTime);
    this.confirmations.commitRead(endLsn);
  }

  // Streamed in-progress transactions (protocol 2): staged until their commit, see BatchBuilder.

  streamStart(xid: number): void {
    this.streamXid = xid;
    this.builder.streamStart(xid);
  }

  streamChange(xid: number): void {
    this.builder.streamChange(xid);
  }

  streamStop(): void {
    this.streamXid = 0;
    this.builder.streamStop();
  }

  streamCommit(xid: number, commitLsn: number, endLsn: number, commitTime: number): void {
    // Its changes count now, at its commit: a chunk whose window it committed in is read again.
    const touched = this.streamTouched.get(xid);
    if (touched) {
      this.streamTouched.delete(xid);
      for (const oid of touched) this.snapshotTables.get(oid)?.window()?.noteRedo();
    }
    this.builder.streamCommit(xid, commitLsn, endLsn, commitTime);
    this.confirmations.commitRead(endLsn);
  }

  streamAbort(xid: number, subXid: number): void {
    if (subXid === xid) this.streamTouched.delete(xid);
    this.builder.streamAbort(xid, subXid);
  }

  insert(relationOid: number, after: TupleView): void {
    if (this.isSkipped(relationOid)) return;
    if (this.streamXid !== 0) this.noteStreamed(relationOid);
    else if (this.snapshot !== null) this.noteSnapshotChange(relationOid, after);
    this.builder.insert(relationOid, after);
  }

  update(
    relationOid: number,
    beforeKind: 'K' | 'O' | null,
    before: TupleView | null,
    after: TupleView,
  ): void {
    if (this.isSkipped(relationOid)) return;
    if (this.streamXid !== 0) this.noteStreamed(relationOid);
    else if (this.snapshot !== null) {
      if (before !== null) this.noteSnapshotChange(relationOid, before);
      this.noteSnapshotChange(relationOid, after, 'update');
    }
    this.builder.update(relationOid, beforeKind, before, after);
  }

  delete(relationOid: number, beforeKind: 'K' | 'O', before: TupleView): void {
    if (this.isSkipped(relationOid)) return;
    if (this.streamXid !== 0) this.noteStreamed(relationOid);
    else if (this.snapshot !== null) this.noteSnapshotChange(relationOid, before);
    this.builder.delete(relationOid, beforeKind, before);
  }

  /** A table never captured (the buffer's own, when source and buffer coincide). */
  private isSkipped(relationOid: number): boolean {
    return this.skippedRelations.size > 0 && this.skippedRelations.has(relationOid);
  }

  other(message: PgoutputMessage): void {
    switch (message.tag) {
      case 'relation': {
        if (this.skippedTables.has(`${message.schema}.${message.name}`)) {
          this.skippedRelations.add(message.relationOid);
          return;
        }
        const resolver = this.resolver!;
        const b = this.builder;
        this.block('catalog', async () => {
          b.relation(await resolver.resolveRelation(message));
        });
        return;
      }
      case 'type':
        this.resolver!.noteType(message.typeOid, message.name);
        return;
      case 'truncate':
        // A streamed TRUNCATE counts at its transaction's commit, like its other changes (it
        // may still roll back); a decoded one is committed already.
        for (const oid of message.relationOids)
          if (this.streamXid !== 0) this.noteStreamed(oid);
          else this.snapshotTables.get(oid)?.window()?.noteTruncate();
        this.builder.truncate(
          message.relationOids.filter((oid) => !this.isSkipped(oid)),
          message.cascade,
          message.restartIdentity,
        );
        return;
      case 'message':
        this.onLogicalMessage(message);
        return;
      default:
        // Type and Origin messages carry nothing we store.
        return;
    }
  }

  /**
   * A logical message (pg_logical_emit_message) with a configured prefix: a transactional one is
   * an event in its transaction, in order; a non-transactional one is stored on its own, with the
   * checkpoint at its end (see BatchBuilder.standaloneMessage).
   */
  private onLogicalMessage(message: Extract<PgoutputMessage, { tag: 'message' }>): void {
    if (message.prefix === WATERMARK_PREFIX && message.transactional) {
      this.onWatermark(message.content);
      return;
    }
    if (message.prefix === DDL_MESSAGE_PREFIX && this.task.source.ddl && message.transactional) {
      this.builder.ddl(message.content);
      return;
    }
    if (!this.messagePrefixes.has(message.prefix)) return;
    if (message.transactional) {
      this.builder.message(message.prefix, message.content);
      return;
    }
    const lsn = Number(message.lsn);
    // µs since 2000-01-01, as commit times travel.
    const readAt = Date.now() * 1000 - Number(PG_EPOCH_OFFSET_US);
    this.builder.standaloneMessage(lsn, readAt, message.prefix, message.content);
    this.confirmations.commitRead(lsn);
  }

  // ---- snapshot (workers/snapshot/) ----

  /** Starts a snapshot's copy, or queues it behind the one running (one at a time, in order). */
  private startSnapshot(plan: PendingSnapshot): void {
    if (this.snapshot !== null) {
      if (this.snapshot.id !== plan.id && !this.snapshotQueue.some((s) => s.id === plan.id))
        this.snapshotQueue.push(plan);
      return;
    }
    const options = this.snapshotOptions;
    if (options === null) {
      this.snapshotQueue.push(plan); // started once streaming starts
      return;
    }
    if (!this.snapshotsSupported) {
      this.log.warn(
        { snapshot: plan.id },
        'snapshot: PostgreSQL before 14 cannot send the watermark messages a snapshot needs; the existing rows are not copied',
      );
      return;
    }
    const resolver = this.resolver!;
    const runner = new SnapshotRunner({
      connection: options,
      publication: this.task.source.publication,
      skipped: this.skippedTables,
      snapshot: plan,
      run: randomUUID(),
      chunkRows: this.task.settings.snapshotChunkRows,
      parallelTables: this.task.settings.snapshotParallelTables,
      hooks: {
        resolve: (oid, schema, table) => resolver.resolveCatalogRelation(oid, schema, table),
        begin: (table, window) => this.snapshotTables.set(table.oid, { table, window }),
        end: (table) => this.snapshotTables.delete(table.oid),
      },
      log: this.log,
    });
    this.snapshot = runner;
    runner.runAll().then(
      () => {
        this.log.info({ snapshot: plan.id }, 'snapshot: copy finished');
        if (this.snapshot !== runner) return;
        this.snapshot = null;
        const next = this.snapshotQueue.shift();
        if (next !== undefined && !this.stopping && this.failed === null) this.startSnapshot(next);
      },
      (error: unknown) => this.fail(error),
    );
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
  private noteSnapshotChange(oid: number, tuple: TupleView, kind?: 'update'): void {
    const entry = this.snapshotTables.get(oid);
    const window = entry?.window();
    if (!window?.isOpen) return;
    const relation = this.builder.relationOf(oid);
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
  private onWatermark(content: Uint8Array): void {
    const w = parseWatermark(content);
    if (w !== null) this.builder.markOwnTransaction();
    const found = w === null ? null : this.snapshot?.windowFor(w);
    if (!w || !found) return; // not ours, or void (an earlier run's)
    if (w.mark === 'low') {
      found.window.openAt();
      return;
    }
    const rows = found.window.close();
    // Rows to read again keep the table running, their keys recorded, until they are read.
    const reread = this.snapshot!.closed(w.table, found.window);
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
      finished: state !== 'running' && this.snapshot!.noteTableDone(w.table),
    };
    const entry = [...this.snapshotTables.values()].find((e) => e.table.name === w.table);
    if (entry && rows.length > 0) {
      const { oid, relation } = entry.table;
      if (!this.builder.hasRelation(oid)) this.builder.relation(relation);
      const current = this.builder.relationOf(oid)!;
      const names = relation.columns.map((c) => c.name);
      const same =
        current.columns.length === names.length &&
        current.columns.every((c, i) => c.name === names[i]);
      const positions = same ? null : current.columns.map((c) => names.indexOf(c.name));
      this.builder.snapshotRows(oid, found.rows, rows, positions);
    }
    this.builder.noteSnapshotProgress({ ...progress, snapshotId: w.snapshot, rows: rows.length });
    // The first chunk records every table of the plan, so that a resume copies those only.
    for (const t of this.snapshot!.takePlanToRecord()) {
      if (t.schema === progress.schema && t.table === progress.table) continue;
      this.builder.noteSnapshotProgress({
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

  /** Pauses reading until `work` is done, then handles what queued up meanwhile. */
  private block(reason: 'catalog' | 'slot' | 'buffer', work: () => Promise<void>): void {
    this.blocked = reason;
    this.pauseStream();
    this.blockedWork = work().then(
      () => {
        this.blocked = null;
        this.blockedWork = null;
        // The stream was paused by us, not silent.
        this.lastHeardAt = Date.now();
        this.drainQueue();
      },
      (error: unknown) => this.fail(error),
    );
  }

  private drainQueue(): void {
    while (this.blocked === null && this.queue.length > 0 && this.failed === null) {
      if (this.stopping) {
        this.queue.length = 0;
        return;
      }
      this.handle(this.queue.shift()!, true);
    }
    if (this.blocked !== null || this.failed !== null || this.stopping) return;
    this.scheduleFlush();
    this.resumeStream();
  }

  private pauseStream(): void {
    this.stream?.pause();
  }

  private resumeStream(): void {
    this.stream?.resume();
  }

  private onKeepalive(walEnd: bigint, shouldRespond: boolean): void {
    this.lastHeardAt = Date.now();
    this.confirmations.keepalive(walEnd, this.isIdle());
    if (shouldRespond) {
      // The server asks for a reply (its shutdown waits for one): answer at once, with the best
      // position that is safe, instead of waiting for the next checkpoint interval.
      this.replyRequested = true;
      this.confirm(true);
    }
  }

  /** Nothing read is pending here: no block, no queue, no open transaction, no unsent batch. */
  private isIdle(): boolean {
    return (
      this.blocked === null &&
      this.queue.length === 0 &&
      !this.builder.isInTransaction &&
      !this.builder.hasContent &&
      !this.stopping
    );
  }

  // ---- batches ----

  /**
   * A batch that is not full goes out once the reader has handled everything the source has sent
   * so far: setImmediate runs after the event loop has read what the socket holds (libuv reads up
   * to 32 chunks per turn), so while a backlog drains batches still fill up, and once caught up
   * a change is sent at once. With PHILOTES_CDC_BATCH_MAX_WAIT > 0 it waits that long for more
   * instead: fewer, larger buffer transactions at low rates, for that much latency.
   */
  private scheduleFlush(): void {
    if (this.cancelScheduledFlush !== null || !this.builder.hasContent) return;
    const send = () => {
      this.cancelScheduledFlush = null;
      // While blocked, what is pending goes out when the block ends (drainQueue reschedules).
      if (this.blocked === null && this.failed === null) this.flush();
    };
    const wait = this.task.settings.batchMaxWaitMs;
    if (wait === 0) {
      const immediate = setImmediate(send);
      this.cancelScheduledFlush = () => clearImmediate(immediate);
    } else {
      const timer = setTimeout(send, wait);
      this.cancelScheduledFlush = () => clearTimeout(timer);
    }
  }

  /** Sends the pending batch, or, with no room in flight, pauses reading until there is. */
  private flush(): void {
    if (this.cancelScheduledFlush !== null) {
      this.cancelScheduledFlush();
      this.cancelScheduledFlush = null;
    }
    if (!this.builder.hasContent) return;
    if (this.hasCredit()) {
      this.send();
      return;
    }
    this.block('buffer', async () => {
      await this.waitForCredit();
      if (this.failed === null) this.send();
    });
  }

  private hasCredit(): boolean {
    return !this.held && this.confirmations.inFlight < this.task.settings.maxInFlightBatches;
  }

  private async waitForCredit(): Promise<void> {
    while (!this.hasCredit() && this.failed === null) {
      await new Promise<void>((resolve) => this.creditWaiters.push(resolve));
    }
  }

  private send(): void {
    if (!this.builder.hasContent) return;
    const batch = this.builder.take();
    const message: ReaderMessage = {
      type: 'batch',
      seq: this.confirmations.sent(),
      ...batch,
      // 64-bit, so that a later start compares it with the server's next xid without wraparound.
      checkpointXid:
        batch.checkpointXid === null || batch.checkpointXid === 0
          ? batch.checkpointXid
          : Number(fullXid(batch.checkpointXid, this.xidReference)),
    };
    this.task.port.postMessage(message, batchTransferList(batch));
  }

  private onSupervisorMessage(message: SupervisorMessage): void {
    switch (message.type) {
      case 'durable': {
        this.confirmations.durable(
          message.seq,
          message.lsn === null ? null : parseLsn(message.lsn),
        );
        const waiters = this.creditWaiters.splice(0);
        for (const w of waiters) w();
        if (this.confirmations.allDurable) for (const w of this.durableWaiters.splice(0)) w();
        if (this.replyRequested) this.confirm(true);
        break;
      }
      case 'hold':
        this.held = message.held;
        if (!this.held) for (const w of this.creditWaiters.splice(0)) w();
        break;
      case 'recorded': {
        this.confirmations.recorded(parseLsn(message.lsn));
        const recorded = this.confirmations.recordedUpTo;
        const waiting = this.recordWaiters;
        this.recordWaiters = waiting.filter((w) => w.lsn > recorded);
        for (const w of waiting) if (w.lsn <= recorded) w.resolve();
        // The confirmation that asked for this record can go out now.
        if (!this.stopping) this.confirm(this.replyRequested);
        break;
      }
      case 'snapshot':
        if (!this.stopping && this.failed === null) this.startSnapshot(message.snapshot);
        break;
      case 'stop':
        void this.stop();
        break;
      case 'abort':
        this.fail(new ReaderAbortedError(), false);
        break;
    }
  }

  // ---- confirmations ----

  /**
   * Confirms the safe position to the source. Called once per checkpoint interval, when the
   * server asks for a reply, and at shutdown: confirmations are coalesced, not sent per batch.
   * A safe position past what the buffer records (an idle WAL end) is recorded first, and
   * confirmed when the supervisor reports it recorded.
   */
  private confirm(answer: boolean): void {
    if (this.failed !== null) return;
    const next = this.confirmations.next(this.isIdle(), this.stopping);
    if (next.record !== null) this.post({ type: 'record', lsn: formatLsn(next.record) });
    if (next.confirm !== null) {
      this.sendStatus();
      this.reportProgress();
    } else if (answer) {
      this.sendStatus();
    }
    if (this.confirmations.confirmed >= this.confirmations.serverWalEnd) {
      this.replyRequested = false;
    }
  }

  /**
   * Asks the buffer to record `lsn` with what goes with it (the start's identity, DDL that may
   * have gone uncaptured) and waits until it has; sent even when `lsn` is recorded already.
   */
  private async recordWith(
    lsn: bigint,
    extra: { identity?: SourceIdentity; ddlGap?: DdlGap | null },
  ): Promise<void> {
    const recorded = new Promise<void>((resolve) => this.recordWaiters.push({ lsn, resolve }));
    this.confirmations.askRecord(lsn);
    const gap = extra.ddlGap;
    this.post({
      type: 'record',
      lsn: formatLsn(lsn),
      ...(extra.identity === undefined ? {} : { identity: extra.identity }),
      ...(gap == null
        ? {}
        : { ddlGap: { fromLsn: formatLsn(gap.fromLsn), toLsn: formatLsn(gap.toLsn) } }),
    });
    await recorded;
  }

  /** Resolves once the buffer records `lsn` as confirmable (or the reader has failed). */
  private async record(lsn: bigint): Promise<void> {
    if (lsn <= this.confirmations.recordedUpTo || this.failed !== null) return;
    const recorded = new Promise<void>((resolve) => this.recordWaiters.push({ lsn, resolve }));
    if (this.confirmations.askRecord(lsn)) this.post({ type: 'record', lsn: formatLsn(lsn) });
    await recorded;
  }

  /**
   * A connection can die without a reset (a partition, a frozen server): nothing arrives and the
   * socket never errors. We ask the server for a reply with every periodic status update, so
   * silence longer than the source timeout means the connection is gone. Not while we hold the
   * stream paused waiting for the buffer: then silence is ours.
   */
  private checkSourceSilence(): void {
    if (this.blocked === 'buffer' || this.stopping || this.failed !== null) return;
    if (this.received !== this.receivedAtLastCheck) {
      this.receivedAtLastCheck = this.received;
      this.lastHeardAt = Date.now();
    }
    const silent = Date.now() - this.lastHeardAt;
    if (silent > this.task.settings.sourceTimeoutMs) {
      this.fail(new SourceTimeoutError(silent));
    }
  }

  private sendStatus(ping = false): void {
    const confirmed = this.confirmations.confirmed;
    if (this.failed !== null || !this.stream || confirmed === 0n) return;
    void this.stream.acknowledge(confirmed, ping).catch((e: unknown) => this.fail(e));
  }

  /** The WAL the source holds for the slot, for the metrics; a failed poll only skips a sample. */
  private async reportSlot(): Promise<void> {
    const side = this.side;
    if (side === null || this.failed !== null) return;
    if (this.task.source.ddl) await this.checkDdlCapture(side);
    if (this.failed !== null) return;
    try {
      // One after the other: a pg client runs one query at a time.
      const slot = await readSlotState(side, this.task.source.slot);
      const now = await currentWalLsn(side);
      this.xidReference = await readNextXid(side, this.serverVersion);
      if (slot === null) return;
      const decoding =
        this.serverVersion >= 140000
          ? await readSlotDecodingStats(side, this.task.source.slot)
          : null;
      this.post({
        type: 'slot',
        retainedWalBytes: retainedWalBytes(slot, now),
        safeWalSizeBytes: slot.safeWalSize,
        walStatus: slot.walStatus,
        decoding,
      });
    } catch (error) {
      this.log.debug({ err: error }, 'reading the slot state failed');
    }
  }

  /**
   * With `ddl: true`, the trigger must stay in place: dropped or disabled while Philotes runs,
   * DDL would go missing from the buffer without a word. The source stops and says so; a start
   * with a role that may install it puts it back.
   */
  private async checkDdlCapture(side: pg.Client): Promise<void> {
    let state;
    let before: bigint;
    try {
      // Read first: DDL committed before this position ran while the trigger was still there
      // (it is, below), so it was captured.
      before = await currentWalLsn(side);
      state = await readDdlTriggerState(side);
    } catch (error) {
      this.log.debug({ err: error }, 'reading the DDL capture trigger state failed');
      return;
    }
    if (ddlTriggerCurrent(state)) {
      this.ddlVerifiedLsn = before;
      return;
    }
    // DDL from the last check that found the trigger to now may be missing: recorded before the
    // source stops (the start that puts the trigger back records the rest, from the checkpoint).
    const from = this.ddlVerifiedLsn ?? this.startLsn;
    // To the WAL now: past anything this run can still store, so the start that puts the
    // trigger back (its gap begins at the checkpoint) leaves no hole in between.
    const to = await currentWalLsn(side).catch(() => before);
    await this.recordWith(this.confirmations.recordedUpTo, {
      ddlGap: { fromLsn: from, toLsn: to },
    });
    this.fail(
      new FatalSourceError(
        `the DDL capture trigger on ${where(this.task.source)} was removed or disabled while Philotes ran: DDL made since ${formatLsn(from)} may be missing from the buffer (recorded in cdc_gaps, reason ddl_not_captured). A start with a superuser role (or philotes-worker ddl-trigger --source ${this.task.source.id}) puts it back`,
        'DDL_TRIGGER_MISSING',
        { ddlVerifiedLsn: formatLsn(from), detectedLsn: formatLsn(to) },
      ),
    );
  }

  private reportProgress(): void {
    const { serverWalEnd, confirmed } = this.confirmations;
    this.post({
      type: 'progress',
      serverWalEnd: serverWalEnd === 0n ? null : formatLsn(serverWalEnd),
      confirmedLsn: confirmed === 0n ? null : formatLsn(confirmed),
    });
  }

  // ---- lifecycle ----

  private async stop(): Promise<void> {
    if (this.stopping || this.failed !== null) return;
    this.stopping = true;
    this.log.info('stop requested: storing what is in flight');
    try {
      // Stop reading. What was read but not handled is dropped (never stored, never confirmed;
      // the next run reads it again). With our socket paused, a walsender busy sending a large
      // transaction gets to read our final status update instead of failing on a closed socket.
      this.pauseStream();
      this.queue.length = 0;
      if (this.blockedWork) await this.blockedWork;
      await this.waitForCredit();
      if (this.failed !== null) return;
      this.send();
      if (!this.confirmations.allDurable && this.failed === null) {
        await new Promise<void>((resolve) => this.durableWaiters.push(resolve));
      }
      if (this.failed !== null) return;
      await this.record(this.confirmations.safeLsn(false, true));
      if (this.failed !== null) return;
      this.confirm(true);
      const reached = await this.waitForSlotConfirmation();
      this.log.info(
        { confirmedLsn: formatLsn(this.confirmations.confirmed), slotConfirmedFlushLsn: reached },
        'final position confirmed to source',
      );
      this.settle.resolve();
    } catch (error) {
      this.fail(error);
    }
  }

  /**
   * A status update is fire-and-forget; before closing, make sure the server has taken it, by
   * reading the slot back (and re-sending meanwhile). Bounded: the data is safe either way,
   * since a restart resumes from the buffer checkpoint; only the slot's WAL retention is at stake.
   */
  private async waitForSlotConfirmation(): Promise<string | null> {
    const deadline = Date.now() + FINAL_CONFIRM_TIMEOUT_MS;
    let seen: string | null = null;
    while (this.side && this.failed === null) {
      const result = await this.side.query<{ lsn: string | null }>(
        'SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1',
        [this.task.source.slot],
      );
      seen = result.rows[0]?.lsn ?? null;
      if (seen !== null && parseLsn(seen) >= this.confirmations.confirmed) return seen;
      if (Date.now() >= deadline) {
        this.log.warn(
          { confirmedLsn: formatLsn(this.confirmations.confirmed), slotConfirmedFlushLsn: seen },
          'the source has not taken the final confirmation yet; it will be sent again on the next start',
        );
        return seen;
      }
      this.sendStatus();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return seen;
  }

  /** A warning from the walsender: one that means a gap stops the source (see source-errors). */
  private onNotice(notice: SourceNotice): void {
    const gap = noticeGapError(notice, this.task.source);
    if (gap !== null) {
      this.fail(gap);
      return;
    }
    this.log.warn(
      { notice: { severity: notice.severity, code: notice.code, message: notice.message } },
      'the source sent a warning on the replication connection',
    );
  }

  private fail(failure: unknown, report = true): void {
    if (this.failed !== null) return;
    const error = explainSourceError(failure, this.task.source);
    this.failed = error ?? new Error('unknown error');
    if (report) this.log.error({ err: error }, 'reader failed');
    for (const w of this.creditWaiters.splice(0)) w();
    for (const w of this.durableWaiters.splice(0)) w();
    for (const w of this.recordWaiters.splice(0)) w.resolve();
    this.settle.reject(error);
  }

  private post(message: ReaderMessage): void {
    try {
      this.task.port.postMessage(message);
    } catch {
      // The port is closed when the supervisor has given up on this run; nothing to tell.
    }
  }

  private async close(): Promise<void> {
    this.snapshot?.stop();
    for (const t of this.timers) clearInterval(t);
    this.cancelScheduledFlush?.();
    const stream = this.stream;
    this.stream = null;
    const side = this.side;
    const ended = Promise.allSettled([stream?.destroy(), side?.end()]);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      ended.then(() => false),
      new Promise<boolean>(
        (resolve) => (timer = setTimeout(() => resolve(true), CLOSE_TIMEOUT_MS)),
      ),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      // A dead peer never answers the goodbye: drop the sockets so the thread holds nothing.
      stream?.dropSocket();
      dropClientSocket(side);
      this.log.warn('connections to the source did not close in time; dropped them');
    }
    this.log.info('reader closed');
    this.log.flush();
  }
}
