/**
 * The buffer writer: stores every reader's batches, per source in order, and coalesces what
 * several sources have waiting into one buffer transaction (each source's checkpoint upserted in
 * it). One process-wide BatchWriter runs at most `writers` transactions at a time; each reader
 * run writes through its own SourceWriter, which only stores and reports — what the reports mean
 * for metrics and state is the source runner's business.
 *
 * Coalescing is group commit, not a timer: a batch never waits for others to join it. When a
 * transaction slot is free, the next group is what has piled up meanwhile, oldest source first,
 * up to MAX_GROUP_BYTES. So an idle buffer stores a lone batch at once, and a busy one does more
 * per commit instead of queueing more commits.
 *
 * Isolation: a group that fails before COMMIT was rolled back whole, so each source's part is
 * retried alone; only a source whose own transaction fails stops (its run restarts from the
 * checkpoint). A failed COMMIT has an unknown outcome and is never retried: every source in it
 * restarts from the checkpoint the buffer actually holds.
 *
 * Memory: the bytes queued and being written, across all sources, are capped. Above the cap
 * every reader is told to hold (it stops reading its slot and keeps answering keepalives); below
 * half of it they carry on.
 */
import type { SourceIdentity } from '../common/source-history.js';
import type { SourceConfig } from '../common/config.js';
import type { Logger } from '../common/logger.js';
import { batchBytes, type BatchMessage } from '../common/protocol.js';
import {
  CommitOutcomeUnknownError,
  type BufferStore,
  type StoredGroup,
  type StoreGroupPart,
} from '../buffer/store.js';

/** Coalesce at most this much queued data into one buffer transaction. */
const MAX_GROUP_BYTES = 64 * 1024 * 1024;

export interface BatchWriterSettings {
  /** Store several sources' batches in one transaction (off: one source per transaction). */
  readonly coalesce: boolean;
  /** Buffer transactions in progress at once. */
  readonly writers: number;
  /** Bytes queued and being written, across all sources, above which readers hold. */
  readonly maxBytesInFlight: number;
  /** NOTIFY consumers after a commit that stored events (wakeups.ts). */
  readonly wakeups: boolean;
}

/** What the process-wide writer does, for the metrics. */
export interface BatchWriterObserver {
  transaction(sources: number, durationMs: number): void;
  inFlight(bytes: number, holding: boolean): void;
}

/** One buffer transaction's worth of one source's batches, once it has committed. */
export interface StoredGroupReport {
  readonly batches: readonly BatchMessage[];
  readonly bytes: number;
  readonly stored: StoredGroup;
  readonly durationMs: number;
  /** When the transaction committed (ms since epoch). */
  readonly storedAt: number;
}

export interface SourceWriterEvents {
  /** Batches waiting to be stored. */
  queued(length: number): void;
  stored(report: StoredGroupReport): void;
  /** Everything up to batch `seq` is committed; the checkpoint is `lsn` if they moved it. */
  durable(seq: number, lsn: string | null): void;
  recorded(lsn: string, ticket?: number): void;
  /** The first failure; nothing more is written after it. */
  failed(error: unknown, what: string): void;
  /** Stop (true) or carry on (false) reading: the bytes in flight across all sources. */
  hold(held: boolean): void;
}

interface Part {
  readonly writer: SourceWriter;
  readonly batches: BatchMessage[];
  readonly bytes: number;
}

export class BatchWriter {
  private readonly writers = new Set<SourceWriter>();
  /** Writers with batches queued and none being stored, in the order they became so. */
  private readonly ready: SourceWriter[] = [];
  private active = 0;
  private bytes = 0;
  private holding = false;

  constructor(
    private readonly store: BufferStore,
    private readonly settings: BatchWriterSettings,
    private readonly log: Logger,
    private readonly observer: BatchWriterObserver,
  ) {}

  /** The writer for one reader run of `source`. */
  open(source: SourceConfig, events: SourceWriterEvents): SourceWriter {
    const writer = new SourceWriter(this, this.store, source, events);
    this.writers.add(writer);
    if (this.holding) events.hold(true);
    return writer;
  }

  /** @internal SourceWriter's calls. */
  added(writer: SourceWriter, bytes: number): void {
    this.addBytes(bytes);
    if (!writer.busy && !this.ready.includes(writer)) this.ready.push(writer);
    this.schedule();
  }

  /** @internal */
  dropped(writer: SourceWriter, bytes: number, closed: boolean): void {
    const at = this.ready.indexOf(writer);
    if (at >= 0) this.ready.splice(at, 1);
    if (closed) this.writers.delete(writer);
    this.addBytes(-bytes);
  }

  private addBytes(delta: number): void {
    this.bytes += delta;
    const max = this.settings.maxBytesInFlight;
    const holding = this.holding ? this.bytes > max / 2 : this.bytes > max;
    if (holding !== this.holding) {
      this.holding = holding;
      this.log.info(
        { bytesInFlight: this.bytes, maxBytesInFlight: max },
        holding
          ? 'buffer writes are behind: all readers hold until half of it is stored'
          : 'buffer writes caught up: readers carry on',
      );
      for (const writer of this.writers) writer.hold(holding);
    }
    this.observer.inFlight(this.bytes, this.holding);
  }

  private schedule(): void {
    while (this.active < this.settings.writers && this.ready.length > 0) {
      const group = this.takeGroup();
      if (group.length === 0) return;
      this.active++;
      void this.write(group).finally(() => {
        this.active--;
        this.schedule();
      });
    }
  }

  private takeGroup(): Part[] {
    const group: Part[] = [];
    let room = MAX_GROUP_BYTES;
    for (let i = 0; i < this.ready.length;) {
      const part = this.ready[i]!.take(room, group.length === 0);
      if (part === null) {
        i++;
        continue;
      }
      this.ready.splice(i, 1);
      group.push(part);
      room -= part.bytes;
      if (!this.settings.coalesce || room <= 0) break;
    }
    return group;
  }

  private async write(group: Part[]): Promise<void> {
    try {
      const started = performance.now();
      let results: StoredGroup[];
      try {
        results = await this.store.storeGroup(group.map(toStorePart));
      } catch (error) {
        if (group.length === 1 || error instanceof CommitOutcomeUnknownError) {
          for (const part of group) part.writer.fail(error);
          return;
        }
        // Rolled back whole: store each source's part alone, so that only the sources whose
        // own transaction fails stop.
        this.log.warn(
          { err: error, sources: group.map((p) => p.writer.source.id) },
          `a buffer transaction for ${group.length} sources failed; storing each source's batches alone`,
        );
        await this.writeAlone(group);
        return;
      }
      const durationMs = performance.now() - started;
      this.observer.transaction(group.length, durationMs);
      const storedAt = Date.now();
      group.forEach((part, i) => part.writer.stored(part, results[i]!, durationMs, storedAt));
      this.wake(group.filter((_, i) => results[i]!.checkpointLsn !== null));
    } finally {
      for (const part of group) {
        this.addBytes(-part.bytes);
        part.writer.settled();
      }
    }
  }

  /** New events below these sources' checkpoints: their consumers are woken (wakeups.ts). */
  private wake(parts: readonly Part[]): void {
    if (parts.length > 0 && this.settings.wakeups)
      this.store.wakeups.stored(parts.map((p) => p.writer.source.id));
  }

  private async writeAlone(group: readonly Part[]): Promise<void> {
    for (const part of group) {
      // Its run was aborted meanwhile: nothing more of it may be stored.
      if (part.writer.isClosed) continue;
      const started = performance.now();
      try {
        const [result] = await this.store.storeGroup([toStorePart(part)]);
        const durationMs = performance.now() - started;
        this.observer.transaction(1, durationMs);
        part.writer.stored(part, result!, durationMs, Date.now());
        if (result!.checkpointLsn !== null) this.wake([part]);
      } catch (error) {
        part.writer.fail(error);
      }
    }
  }
}

function toStorePart(part: Part): StoreGroupPart {
  return { sourceId: part.writer.source.id, slot: part.writer.source.slot, batches: part.batches };
}

/** One reader run's way into the buffer: its batches in order, one part of a group at a time. */
export class SourceWriter {
  private readonly queue: BatchMessage[] = [];
  private queuedBytes = 0;
  /** A part of this source is being stored. */
  busy = false;
  private closed = false;
  private failure: unknown = null;
  private whenSettled: (() => void)[] = [];

  constructor(
    private readonly writer: BatchWriter,
    private readonly store: BufferStore,
    readonly source: SourceConfig,
    private readonly events: SourceWriterEvents,
  ) {}

  get hasFailed(): boolean {
    return this.failure !== null;
  }

  get isClosed(): boolean {
    return this.closed || this.failure !== null;
  }

  enqueue(batch: BatchMessage): void {
    if (this.isClosed) return;
    this.queue.push(batch);
    const bytes = batchBytes(batch);
    this.queuedBytes += bytes;
    this.events.queued(this.queue.length);
    this.writer.added(this, bytes);
  }

  /** Records a position the reader wants to confirm past the checkpoint, then says so. */
  async recordConfirmable(
    lsn: string,
    identity?: SourceIdentity,
    ddlGap?: { fromLsn: string; toLsn: string },
    ticket?: number,
  ): Promise<void> {
    if (this.isClosed) return;
    try {
      await this.store.recordConfirmable(this.source.id, this.source.slot, lsn, identity, ddlGap);
      this.events.recorded(lsn, ticket);
    } catch (error) {
      this.fail(error, 'recording a confirmable position in the buffer failed');
    }
  }

  /**
   * Nothing more is written: queued batches are dropped (never written after an earlier one was
   * dropped, which would move the checkpoint past a gap; the next run re-reads them from the
   * checkpoint). Resolves once a write in progress has finished, so that nothing from this run
   * is stored after the next run has cleaned up beyond the checkpoint.
   */
  async close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      this.dropQueue(true);
    }
    while (this.busy) await new Promise<void>((resolve) => this.whenSettled.push(resolve));
  }

  /** @internal The next part to store: batches from the head of the queue within `room`. */
  take(room: number, atLeastOne: boolean): Part | null {
    if (this.isClosed || this.busy || this.queue.length === 0) return null;
    const batches: BatchMessage[] = [];
    let bytes = 0;
    while (this.queue.length > 0) {
      const size = batchBytes(this.queue[0]!);
      if (bytes + size > room && !(atLeastOne && batches.length === 0)) break;
      batches.push(this.queue.shift()!);
      bytes += size;
    }
    if (batches.length === 0) return null;
    this.queuedBytes -= bytes;
    this.busy = true;
    this.events.queued(this.queue.length);
    return { writer: this, batches, bytes };
  }

  /** @internal The part committed. */
  stored(part: Part, stored: StoredGroup, durationMs: number, storedAt: number): void {
    this.events.stored({ batches: part.batches, bytes: part.bytes, stored, durationMs, storedAt });
    // Only now, with the buffer transaction committed, may the reader confirm this far.
    this.events.durable(part.batches[part.batches.length - 1]!.seq, stored.checkpointLsn);
  }

  /** @internal The part is no longer being stored (committed or not). */
  settled(): void {
    this.busy = false;
    for (const resolve of this.whenSettled.splice(0)) resolve();
    if (!this.isClosed && this.queue.length > 0) this.writer.added(this, 0);
  }

  /** @internal */
  hold(held: boolean): void {
    if (!this.isClosed) this.events.hold(held);
  }

  /** @internal */
  fail(error: unknown, what = 'storing a batch in the buffer failed'): void {
    if (this.failure !== null || this.closed) return;
    this.failure = error;
    this.dropQueue(false);
    this.events.queued(0);
    this.events.failed(error, what);
  }

  private dropQueue(closed: boolean): void {
    const bytes = this.queuedBytes;
    this.queue.length = 0;
    this.queuedBytes = 0;
    this.writer.dropped(this, bytes, closed || this.failure !== null);
  }
}
