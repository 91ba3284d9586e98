/**
 * The buffer writer of one reader run: stores the reader's batches in order, several per buffer
 * transaction when they pile up, and records positions the reader wants to confirm past the
 * checkpoint. It only writes and reports; what the reports mean for metrics and state is the
 * source runner's business.
 */
import type { SourceConfig } from '../common/config.js';
import type { BatchMessage } from '../common/protocol.js';
import type { BufferStore, StoredGroup } from '../buffer/store.js';

/** Coalesce at most this much queued data into one buffer transaction. */
const MAX_GROUP_BYTES = 64 * 1024 * 1024;

/** One buffer transaction's worth of batches, once it has committed. */
export interface StoredGroupReport {
  readonly batches: readonly BatchMessage[];
  readonly bytes: number;
  readonly stored: StoredGroup;
  readonly durationMs: number;
  /** When the transaction committed (ms since epoch). */
  readonly storedAt: number;
}

export interface BatchWriterEvents {
  /** Batches waiting to be stored. */
  queued(length: number): void;
  stored(report: StoredGroupReport): void;
  /** Everything up to batch `seq` is committed; the checkpoint is `lsn` if they moved it. */
  durable(seq: number, lsn: string | null): void;
  recorded(lsn: string): void;
  /** The first failure; nothing more is written after it. */
  failed(error: unknown, what: string): void;
}

export class BatchWriter {
  private readonly queue: BatchMessage[] = [];
  private writing = false;
  private closed = false;
  private failure: unknown = null;

  constructor(
    private readonly store: BufferStore,
    private readonly source: SourceConfig,
    private readonly events: BatchWriterEvents,
  ) {}

  get hasFailed(): boolean {
    return this.failure !== null;
  }

  enqueue(batch: BatchMessage): void {
    if (this.failure !== null || this.closed) return;
    this.queue.push(batch);
    this.events.queued(this.queue.length);
    void this.drain();
  }

  /** Records a position the reader wants to confirm past the checkpoint, then says so. */
  async recordConfirmable(lsn: string): Promise<void> {
    if (this.failure !== null || this.closed) return;
    try {
      await this.store.recordConfirmable(this.source.id, this.source.slot, lsn);
      this.events.recorded(lsn);
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
    this.closed = true;
    this.queue.length = 0;
    while (this.writing) await new Promise((r) => setTimeout(r, 10));
  }

  private fail(error: unknown, what: string): void {
    if (this.failure !== null) return;
    this.failure = error;
    this.queue.length = 0;
    this.events.queued(0);
    this.events.failed(error, what);
  }

  private async drain(): Promise<void> {
    if (this.writing) return;
    this.writing = true;
    try {
      while (this.queue.length > 0 && this.failure === null && !this.closed) {
        const batches: BatchMessage[] = [];
        let bytes = 0;
        while (
          this.queue.length > 0 &&
          (batches.length === 0 || bytes + this.queue[0]!.data.byteLength <= MAX_GROUP_BYTES)
        ) {
          const next = this.queue.shift()!;
          batches.push(next);
          bytes += next.data.byteLength;
        }
        this.events.queued(this.queue.length);
        const started = performance.now();
        const stored = await this.store.storeBatches(this.source.id, this.source.slot, batches);
        const storedAt = Date.now();
        this.events.stored({
          batches,
          bytes,
          stored,
          durationMs: performance.now() - started,
          storedAt,
        });
        // Only now, with the buffer transaction committed, may the reader confirm this far.
        this.events.durable(batches[batches.length - 1]!.seq, stored.checkpointLsn);
      }
    } catch (error) {
      this.fail(error, 'storing a batch in the buffer failed');
    } finally {
      this.writing = false;
    }
  }
}
