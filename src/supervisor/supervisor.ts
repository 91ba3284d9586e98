/**
 * The supervisor: one source runner per configured source, each with its reader thread
 * (piscina) and the writer that stores the reader's batches in the buffer.
 */
import type { ReaderThreads } from './reader-pool.js';
import type { Config } from '../common/config.js';
import type { Logger } from '../common/logger.js';
import type { Metrics } from '../metrics.js';
import type { BufferStore } from '../buffer/store.js';
import { SourceRunner } from './source-runner.js';

export class Supervisor {
  readonly runners: SourceRunner[];

  constructor(
    config: Config,
    private readonly threads: ReaderThreads,
    store: BufferStore,
    metrics: Metrics,
    log: Logger,
    startedAt: number,
    reportFatal?: (source: string, message: string) => void,
  ) {
    this.runners = config.sources.map(
      (source) =>
        new SourceRunner(
          source,
          config,
          this.threads,
          store,
          metrics,
          log.child({ source: source.id }),
          startedAt,
          reportFatal,
        ),
    );
  }

  /** Runs every source until stopped. A source that fails never stops the others. */
  async run(): Promise<void> {
    await Promise.all(this.runners.map((r) => r.run()));
  }

  async stop(): Promise<void> {
    await Promise.all(this.runners.map((r) => r.stop()));
  }
}
