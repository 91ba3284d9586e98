/**
 * The reader: streams one replication slot, decodes it into batches for the supervisor, and
 * confirms positions to the source by the rule in confirmations.ts.
 *
 * This file holds the flow and the lifecycle: start-up (prepare the source, record the start,
 * open the stream), stream order and blocking (for catalog lookups, the slot check and room in
 * flight), batching and credit, the supervisor's messages, the confirmation plumbing, and stop,
 * fail and close. Its parts, each in its own file: where each decoded message goes
 * (change-router.ts); the connections (source-session.ts, made by a factory, so that a unit test
 * drives this flow without a server); the decoder and the batch builder (decode/); the snapshot's
 * stream side (snapshot/stream-side.ts); watching the source (source-watch.ts); the confirmation
 * rule (confirmations.ts). The data path, socket to buffer commit and back: docs/architecture.md.
 *
 * A little over 600 lines on purpose: what is left here is one state machine (blocked, queue,
 * credit, stopping, failed) that every part above reads and that split apart would be shared.
 */
import { describeConnectionError, ReaderAbortedError, toErrorInfo } from '../src/common/errors.js';
import { BUFFER_TABLES } from '../src/common/database-identity.js';
import { createLogger, safeConnection, type Logger } from '../src/common/logger.js';
import { formatLsn, parseLsn } from '../src/common/lsn.js';
import {
  batchTransferList,
  type ReaderMessage,
  type ReaderResult,
  type ReaderTask,
  type SupervisorMessage,
} from '../src/common/protocol.js';
import { supports } from '../src/common/server-features.js';
import { fullXid, type SourceIdentity } from '../src/common/source-history.js';
import { Confirmations } from './confirmations.js';
import { BatchBuilder } from './decode/event-rows.js';
import { PgoutputDecoder } from './decode/pgoutput.js';
import { ChangeRouter } from './change-router.js';
import { KEEPALIVE, XLOG_DATA, XLOG_DATA_HEADER } from './replication-stream.js';
import { explainSourceError } from './source-errors.js';
import {
  pgConnections,
  type ReaderConnections,
  type ReplicationConnection,
  type SourceSession,
} from './source-session.js';
import type { DdlGap } from './source-setup.js';
import { SourceWatch } from './source-watch.js';
import { SnapshotStreamSide } from './snapshot/stream-side.js';

/** Keeps the walsender from timing out while we are paused (its default timeout is 60 s). */
const STATUS_INTERVAL_MS = 5_000;
/** How often the reader reports positions to the supervisor for metrics. */
const PROGRESS_INTERVAL_MS = 1_000;
/** How often the slot's WAL retention is read from the source (one cheap query). */
const SLOT_POLL_INTERVAL_MS = 15_000;
/** How long closing may wait for the source to acknowledge the end of our connections. */
const CLOSE_TIMEOUT_MS = 3_000;

/** Waits until the buffer records `lsn` (or, with a ticket, until it answers that message). */
interface RecordWaiter {
  readonly lsn: bigint;
  readonly ticket?: number;
  readonly resolve: () => void;
}

export class SlotReader {
  private readonly log: Logger;
  private readonly builder: BatchBuilder;
  private readonly decoder = new PgoutputDecoder();
  private session: SourceSession | null = null;
  private stream: ReplicationConnection | null = null;
  private snapshots: SnapshotStreamSide | null = null;
  private router: ChangeRouter | null = null;
  private watch: SourceWatch | null = null;

  /** 'schema.table' of tables never captured (the buffer's own, when source and buffer coincide). */
  private readonly skippedTables = new Set<string>();
  /** Messages read while blocked, handled in order once the block ends. */
  private readonly queue: Buffer[] = [];
  /** Why reading is paused, if it is. */
  private blocked: 'catalog' | 'slot' | 'buffer' | null = null;
  private blockedWork: Promise<void> | null = null;
  private serverVersion = 0;
  /** A recent 64-bit xid of the server: stored checkpoint xids are made 64-bit with it. */
  private xidReference = 0n;
  /** Where this run started streaming: the checkpoint, or where a new capture begins. */
  private startLsn = 0n;
  /** Positions: durable, recorded, confirmed, idle (replaced once the start is known). */
  private confirmations: Confirmations;
  private recordWaiters: RecordWaiter[] = [];
  private nextRecordTicket = 1;
  private replyRequested = false;

  /** Cancels the pending batch's scheduled send, if one is scheduled. */
  private cancelScheduledFlush: (() => void) | null = null;
  private creditWaiters: Array<() => void> = [];
  /** The supervisor's writes are behind across all sources: send nothing more for now. */
  private held = false;
  private durableWaiters: Array<() => void> = [];
  private timers: NodeJS.Timeout[] = [];

  private stopping = false;
  private failed: unknown = null;
  private settle!: { resolve: () => void; reject: (e: unknown) => void };
  private readonly finished: Promise<void>;

  constructor(
    private readonly task: ReaderTask,
    private readonly connections: ReaderConnections = pgConnections(task.source),
  ) {
    this.log = createLogger(task.settings.logLevel, {
      source: task.source.id,
      slot: task.source.slot,
      thread: 'reader',
    });
    this.builder = new BatchBuilder(
      task.source.id,
      task.settings.batchMaxBytes,
      task.source.configFile,
    );
    this.confirmations = new Confirmations(0n, 0n, this.builder);
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
      const session = await this.connections.openSession(this.log, (error) => this.fail(error));
      this.session = session;
      this.log.info({ connection: safeConnection(source.connection) }, 'connected to source');
      const checkpoint = this.task.checkpoint;
      const prepared = await session.prepare(
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
      if ((await session.databaseIdentity()) === this.task.buffer.identity) {
        // Capturing the buffer's own tables would feed every stored event back in as a change.
        for (const table of BUFFER_TABLES)
          this.skippedTables.add(`${this.task.buffer.schema}.${table}`);
        this.log.info(
          { tables: [...this.skippedTables] },
          'the source database is also the buffer: Philotes leaves its own tables out',
        );
      }

      this.startLsn = prepared.startLsn;
      this.serverVersion = prepared.serverVersion;
      this.xidReference = prepared.nextXid;
      // Nothing recorded yet (a source new to the buffer): its start is recorded below.
      this.confirmations = new Confirmations(
        prepared.startLsn,
        prepared.mustRecord ? 0n : prepared.recordedLsn,
        this.builder,
      );
      this.snapshots = new SnapshotStreamSide({
        builder: this.builder,
        catalog: session.catalog,
        publication: source.publication,
        skipped: this.skippedTables,
        settings: this.task.settings,
        log: this.log,
        fail: (error) => this.fail(error),
        mayStart: () => !this.stopping && this.failed === null,
      });
      this.router = new ChangeRouter({
        builder: this.builder,
        snapshots: this.snapshots,
        catalog: session.catalog,
        source,
        skippedTables: this.skippedTables,
        block: (work) => this.block('catalog', work),
      });
      this.watch = this.watchOver(session);
      // The start, and the server's identity, are in the buffer before the slot streams to us:
      // every later start can then tell a slot moved by someone else, or another history.
      await this.recordWith(prepared.recordedLsn, {
        identity: prepared.identity,
        ddlGap: prepared.ddlGap,
      });
      if (this.failed !== null) throw this.failed;
      // The supervisor runs this reader only while it holds the source's lease: a walsender an
      // earlier owner left streaming the slot is stale, and the fence keeps its owner from storing.
      const takeover = await session.takeOverSlot();
      if (takeover?.freed === true)
        this.log.warn(
          { pid: takeover.pid, applicationName: takeover.applicationName },
          'the slot was still streamed by an earlier Philotes reader (a process that died or froze, or this one before a restart): terminated its walsender to take the slot over',
        );
      else if (takeover !== null)
        this.log.warn(
          { pid: takeover.pid, applicationName: takeover.applicationName },
          `the slot is still streamed by pid ${takeover.pid} and was not taken over: ${takeover.why}; the stream starts once the server lets go of it (wal_sender_timeout)`,
        );
      const start = formatLsn(prepared.startLsn);
      const watch = this.watch;
      const snapshots = this.snapshots;
      this.stream = this.connections.openStream(
        source.publication,
        {
          copyData: (chunk, owned) => this.onCopyData(chunk, owned),
          notice: (notice) => watch.onNotice(notice),
          error: (error) => this.fail(error),
          // The server accepted START_REPLICATION and this connection now holds the slot. Check
          // the slot once more before handling anything, and only then count as streaming (a
          // slot held by another client never gets this far).
          started: () =>
            this.block('slot', async () => {
              await watch.verifySlot();
              this.log.info({ startLsn: start, protocol: prepared.protocol }, 'streaming started');
              void watch.reportSlot();
              snapshots.streaming(
                this.connections.snapshotConnection(),
                prepared.serverVersion,
                this.task.snapshot,
              );
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
          messages:
            source.messages.length > 0 ||
            source.ddl ||
            supports(prepared.serverVersion, 'logicalMessages'),
          walSenderTimeoutMs:
            this.task.settings.walSenderTimeoutMs > 0 &&
            supports(prepared.serverVersion, 'walSenderTimeoutPerSession')
              ? this.task.settings.walSenderTimeoutMs
              : null,
        },
      );

      this.timers.push(
        setInterval(() => this.confirm(false), this.task.settings.checkpointIntervalMs),
        setInterval(
          () => {
            watch.checkSilence();
            // Ask for a reply: the server's keepalive answers prove the connection is alive.
            this.sendStatus(true);
          },
          Math.min(STATUS_INTERVAL_MS, this.task.settings.checkpointIntervalMs),
        ),
        // Positions for the lag metrics whether or not anything was confirmed: a stalled buffer
        // must show as growing lag.
        setInterval(() => this.reportProgress(), PROGRESS_INTERVAL_MS),
        // The most reported CDC incident is a slot quietly filling the source's disk.
        setInterval(() => void watch.reportSlot(), SLOT_POLL_INTERVAL_MS),
      );

      const { host, port: sourcePort } = source.connection;
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

  /** The watch's view of this reader (source-watch.ts). */
  private watchOver(session: SourceSession): SourceWatch {
    return new SourceWatch(
      {
        session,
        source: this.task.source,
        log: this.log,
        serverVersion: this.serverVersion,
        startLsn: this.startLsn,
        recordedUpTo: () => this.confirmations.recordedUpTo,
        confirmed: () => this.confirmations.confirmed,
        waitingForBuffer: () => this.blocked === 'buffer',
        done: () => this.stopping || this.failed !== null,
        failed: () => this.failed !== null,
        post: (message) => this.post(message),
        fail: (error) => this.fail(error),
        sendStatus: () => this.sendStatus(),
        recordWith: (lsn, extra) => this.recordWith(lsn, extra),
        noteNextXid: (xid) => (this.xidReference = xid),
      },
      this.task.settings.sourceTimeoutMs,
    );
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
    this.watch!.noteReceived();
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

  private handle(chunk: Buffer, owned: boolean): void {
    try {
      if (chunk[0] === XLOG_DATA) {
        this.decoder.decode(chunk, XLOG_DATA_HEADER, this.router!, owned);
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

  /** Pauses reading until `work` is done, then handles what queued up meanwhile. */
  private block(reason: 'catalog' | 'slot' | 'buffer', work: () => Promise<void>): void {
    this.blocked = reason;
    this.pauseStream();
    this.blockedWork = work().then(
      () => {
        this.blocked = null;
        this.blockedWork = null;
        // The stream was paused by us, not silent.
        this.watch?.noteHeard();
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
    this.watch?.noteHeard();
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
        // A waiter with a ticket waits for the answer to its own message (protocol.ts).
        const answered = (w: RecordWaiter) =>
          w.ticket === undefined ? w.lsn <= recorded : w.ticket === message.ticket;
        const waiting = this.recordWaiters;
        this.recordWaiters = waiting.filter((w) => !answered(w));
        for (const w of waiting) if (answered(w)) w.resolve();
        // The confirmation that asked for this record can go out now.
        if (!this.stopping) this.confirm(this.replyRequested);
        break;
      }
      case 'snapshot':
        if (!this.stopping && this.failed === null) this.snapshots?.request(message.snapshot);
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
    const ticket = this.nextRecordTicket++;
    const recorded = new Promise<void>((resolve) =>
      this.recordWaiters.push({ lsn, ticket, resolve }),
    );
    this.confirmations.askRecord(lsn);
    const gap = extra.ddlGap;
    this.post({
      type: 'record',
      lsn: formatLsn(lsn),
      ticket,
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

  private sendStatus(ping = false): void {
    const confirmed = this.confirmations.confirmed;
    if (this.failed !== null || !this.stream || confirmed === 0n) return;
    void this.stream.acknowledge(confirmed, ping).catch((e: unknown) => this.fail(e));
  }

  private reportProgress(): void {
    const { serverWalEnd, confirmed, capturedUpTo } = this.confirmations;
    this.post({
      type: 'progress',
      serverWalEnd: serverWalEnd === 0n ? null : formatLsn(serverWalEnd),
      confirmedLsn: confirmed === 0n ? null : formatLsn(confirmed),
      capturedLsn: capturedUpTo === 0n ? null : formatLsn(capturedUpTo),
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
      const reached = this.watch === null ? null : await this.watch.waitForSlotConfirmation();
      this.log.info(
        { confirmedLsn: formatLsn(this.confirmations.confirmed), slotConfirmedFlushLsn: reached },
        'final position confirmed to source',
      );
      this.settle.resolve();
    } catch (error) {
      this.fail(error);
    }
  }

  private fail(failure: unknown, report = true): void {
    if (this.failed !== null) return;
    const error = explainSourceError(failure, this.task.source);
    this.failed = error ?? new Error('unknown error');
    // Asked to stop (a shutdown, a hand-over), perhaps while still starting: connections closed
    // under a connect or a START_REPLICATION fail, and that is the stop, not a fault of the source.
    if (report && this.stopping)
      this.log.info(
        { err: error },
        'the reader met an error while stopping: what is stored stays stored',
      );
    else if (report) this.log.error({ err: error }, 'reader failed');
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
    this.snapshots?.stop();
    for (const t of this.timers) clearInterval(t);
    this.cancelScheduledFlush?.();
    const stream = this.stream;
    this.stream = null;
    const session = this.session;
    const ended = Promise.allSettled([stream?.destroy(), session?.end()]);
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
      session?.drop();
      this.log.warn('connections to the source did not close in time; dropped them');
    }
    this.log.info('reader closed');
    this.log.flush();
  }
}
