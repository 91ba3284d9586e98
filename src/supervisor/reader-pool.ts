/**
 * The reader threads: one piscina pool of one thread per source, so that each source has a heap
 * limit of its own (a reader that exceeds it is restarted alone) and sources can come and go.
 * This module imports only piscina, so that the entry point can start the threads before it
 * loads anything heavier.
 */
import { Piscina } from 'piscina';
import type { SourceConfig } from '../common/config.js';

const READER_FILE = new URL('../../workers/slot-reader.js', import.meta.url).href;

/**
 * A reader's young generation, in MB. V8's default lets each thread's nursery grow to tens of MB
 * while it decodes a backlog; measured with 16 sources draining on 2 cores, 4 MB takes ~55 MB off
 * the peak RSS and ~1 s off the CPU of the drain (more, smaller scavenges that stay in cache), and
 * makes no difference to a single source's rate.
 */
const READER_YOUNG_GENERATION_MB = 4;

export class ReaderThreads {
  private readonly pools = new Map<string, Piscina>();
  /** Why a source's thread died with no task on it, until its run asks. */
  private readonly errors = new Map<string, unknown>();

  /**
   * Starts a thread for each source at once: it loads its modules (pg, pino, the decoder) on
   * another core while the main thread loads its own and opens the buffer.
   */
  constructor(sources: readonly SourceConfig[]) {
    for (const source of sources) this.pool(source);
  }

  /** The source's pool, started if it has none yet. */
  pool(source: SourceConfig): Piscina {
    let pool = this.pools.get(source.id);
    if (!pool) {
      pool = new Piscina({
        filename: READER_FILE,
        minThreads: 1,
        maxThreads: 1,
        idleTimeout: Infinity,
        concurrentTasksPerWorker: 1,
        // 'sync' atomics freeze handles a task leaves open; our tasks are long-lived streams.
        atomics: 'disabled',
        // Exceeding it rejects the task with ERR_WORKER_OUT_OF_MEMORY and replaces the thread.
        resourceLimits: {
          maxOldGenerationSizeMb: source.settings.readerHeapLimitMb,
          maxYoungGenerationSizeMb: READER_YOUNG_GENERATION_MB,
        },
      });
      // A thread that dies with no task on it (out of heap while loading its modules) is an
      // 'error' on the pool, which would end the whole process unheard. And a thread that fails
      // while starting makes piscina start no other, so a task queued for it would wait
      // forever: drop the pool (destroying it fails the queued task) and keep the error, which
      // the failed run reports; the retry gets a new pool.
      const created = pool;
      created.on('error', (error: unknown) => {
        this.errors.set(source.id, error);
        if (this.pools.get(source.id) === created) this.pools.delete(source.id);
        void created.destroy().catch(() => undefined);
      });
      this.pools.set(source.id, pool);
    }
    return pool;
  }

  /** The error a source's thread died of outside a task, if one did since the last call. */
  takeError(sourceId: string): unknown {
    const error = this.errors.get(sourceId);
    this.errors.delete(sourceId);
    return error;
  }

  /** Ends a source's thread (it was stopped, and is removed or restarts with new settings). */
  async remove(sourceId: string): Promise<void> {
    const pool = this.pools.get(sourceId);
    this.pools.delete(sourceId);
    this.errors.delete(sourceId);
    await pool?.destroy();
  }

  async destroy(): Promise<void> {
    await Promise.all([...this.pools.values()].map((p) => p.destroy()));
    this.pools.clear();
  }
}
