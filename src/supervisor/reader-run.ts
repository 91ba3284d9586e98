/**
 * One reader run: a thread reading the slot (a piscina task) and the writer storing what it
 * sends. It tells its listener what happens and knows nothing about the runner behind it.
 */
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import type { Piscina } from 'piscina';
import type { SourceConfig } from '../common/config.js';
import { classifyBufferError, ReaderError, ReaderThreadError } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import type {
  ProgressMessage,
  PendingSnapshot,
  ReaderMessage,
  ReaderResult,
  ReaderSettings,
  ReaderTask,
  ReadyMessage,
  SlotStatusMessage,
  SupervisorMessage,
} from '../common/protocol.js';
import type { DatabaseIdentity } from '../common/database-identity.js';
import type { Checkpoint } from '../buffer/store.js';
import type { BatchWriter, SourceWriter, StoredGroupReport } from './batch-writer.js';

/** After asking a reader to abort, wait this long before terminating its thread. */
const ABORT_GRACE_MS = 5_000;

export interface ReaderRunListener {
  ready(message: ReadyMessage): void;
  slot(message: SlotStatusMessage): void;
  progress(message: ProgressMessage): void;
  queued(length: number): void;
  stored(report: StoredGroupReport): void;
}

export interface ReaderRunOptions {
  readonly source: SourceConfig;
  readonly settings: ReaderSettings;
  readonly checkpoint: Checkpoint | null;
  readonly buffer: DatabaseIdentity;
  readonly snapshot: PendingSnapshot | null;
  readonly writer: BatchWriter;
  readonly pool: Piscina;
  /** Why the reader's thread died outside a task, if it did (then the task failed with less). */
  readonly threadError: () => unknown;
  readonly log: Logger;
  readonly listener: ReaderRunListener;
}

export class ReaderRun {
  private readonly channel = new MessageChannel();
  private readonly abortController = new AbortController();
  private readonly writer: SourceWriter;
  private onWriterFailed!: (error: unknown) => void;
  private readonly writerFailed = new Promise<never>((_, reject) => {
    this.onWriterFailed = reject;
  });
  readonly task: Promise<ReaderResult>;

  constructor(private readonly options: ReaderRunOptions) {
    this.writerFailed.catch(() => undefined);
    const { source, settings, checkpoint, listener, log } = options;
    this.writer = options.writer.open(source, {
      queued: (length) => listener.queued(length),
      stored: (report) => listener.stored(report),
      durable: (seq, lsn) => this.send({ type: 'durable', seq, lsn }),
      recorded: (lsn, ticket) =>
        this.send({ type: 'recorded', lsn, ...(ticket === undefined ? {} : { ticket }) }),
      failed: (error, what) => {
        const buffer = classifyBufferError(error);
        log.error({ err: error, problem: buffer.problem }, `${what}: ${buffer.summary}`);
        this.onWriterFailed(error);
      },
      hold: (held) => this.send({ type: 'hold', held }),
    });
    this.channel.port1.on('message', (message: ReaderMessage) => this.onMessage(message));
    const task: ReaderTask = {
      source,
      checkpoint:
        checkpoint === null
          ? null
          : {
              lsn: checkpoint.lsn,
              confirmedLsn: checkpoint.confirmedLsn,
              transactionId: checkpoint.transactionId,
              identity: checkpoint.identity,
            },
      settings,
      buffer: options.buffer,
      snapshot: options.snapshot,
      port: this.channel.port2,
    };
    this.task = options.pool.run(task, {
      transferList: [this.channel.port2 as unknown as MessagePort],
      signal: this.abortController.signal,
    }) as Promise<ReaderResult>;
    this.task.catch(() => undefined);
  }

  /** Resolves when the reader stopped cleanly; rejects with why it did not. */
  async wait(leaseLost: Promise<never>): Promise<void> {
    try {
      const result = await Promise.race([this.task, this.writerFailed, leaseLost]);
      if (result.error) throw new ReaderError(result.error);
    } catch (failure) {
      await this.abort();
      const error = this.options.threadError() ?? failure;
      if ((error as { code?: unknown }).code === 'ERR_WORKER_OUT_OF_MEMORY') {
        // Piscina has replaced the thread already; the retry starts a reader on the new one.
        throw new ReaderThreadError(
          `the reader thread exceeded its heap limit (readerHeapLimitMb ${this.options.source.settings.readerHeapLimitMb}) and was replaced`,
          'READER_OUT_OF_MEMORY',
          error,
        );
      }
      throw error;
    } finally {
      this.channel.port1.close();
      // Leaves the process-wide writer (after a clean stop its queue is empty already).
      await this.writer.close();
    }
  }

  /** A snapshot asked for while this run streams (the reader runs one at a time, in order). */
  startSnapshot(snapshot: PendingSnapshot): void {
    this.send({ type: 'snapshot', snapshot });
  }

  requestStop(): void {
    this.send({ type: 'stop' });
  }

  /**
   * Stops the reader without storing anything more: ask it over the port, and terminate the
   * thread if it does not finish in time. Waits for a write in progress, so nothing from this run
   * is stored after the next run has cleaned up beyond the checkpoint.
   */
  async abort(): Promise<void> {
    const closed = this.writer.close();
    this.send({ type: 'abort' });
    const timer = setTimeout(() => this.abortController.abort(), ABORT_GRACE_MS);
    await this.task.catch(() => undefined);
    clearTimeout(timer);
    await closed;
  }

  private send(message: SupervisorMessage): void {
    try {
      this.channel.port1.postMessage(message);
    } catch {
      // Port already closed: the thread is gone.
    }
  }

  private onMessage(message: ReaderMessage): void {
    switch (message.type) {
      case 'ready':
        this.options.listener.ready(message);
        break;
      case 'batch':
        this.writer.enqueue(message);
        break;
      case 'record':
        void this.writer.recordConfirmable(
          message.lsn,
          message.identity,
          message.ddlGap,
          message.ticket,
        );
        break;
      case 'progress':
        this.options.listener.progress(message);
        break;
      case 'slot':
        this.options.listener.slot(message);
        break;
    }
  }
}
