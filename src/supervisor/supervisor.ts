/**
 * The supervisor: one source runner per configured source, each with its reader thread
 * (piscina) and the writer that stores the reader's batches in the buffer. Sources come and go
 * with a reload (SIGHUP): added ones start, removed ones stop gracefully with their final
 * checkpoint (their slots stay), changed ones restart; the others are not touched.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config, SourceConfig } from '../common/config.js';
import type { Logger } from '../common/logger.js';
import type { Metrics } from '../http/metrics.js';
import type { BufferStore } from '../buffer/store.js';
import type { ReaderThreads } from './reader-pool.js';
import { SourceRunner } from './source-runner.js';
import { BatchWriter } from './batch-writer.js';
import { LeaseKeeper } from './lease-keeper.js';
import { BufferKeeper } from './buffer-keeper.js';

/** How long a stop waits to tell the buffer this process is leaving. */
const LEAVE_WAIT_MS = 1_000;

export interface ReloadResult {
  readonly added: string[];
  readonly removed: string[];
  readonly restarted: string[];
  readonly unchanged: string[];
}

export class Supervisor {
  private readonly entries = new Map<string, { runner: SourceRunner; done: Promise<void> }>();
  private stopping = false;
  private resolveStopped!: () => void;
  private readonly stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));
  /** Reloads run one at a time. */
  private reloading: Promise<unknown> = Promise.resolve();
  /** Every source's batches go through it, coalesced into shared buffer transactions. */
  private readonly writer: BatchWriter;
  /** This process's membership of the fleet and the leases of the sources it captures. */
  readonly leases: LeaseKeeper;
  /** Partitions, retention, and the sizes and lags the metrics show. */
  readonly bufferKeeper: BufferKeeper;

  constructor(
    private config: Config,
    private readonly threads: ReaderThreads,
    private readonly store: BufferStore,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    private readonly startedAt: number,
    /** This process in the fleet: its member id (newMemberId) and version. */
    member: { readonly id: string; readonly version: string },
    private readonly reportFatal?: (source: string, message: string) => void,
  ) {
    this.writer = new BatchWriter(
      store,
      {
        coalesce: config.commitCoalesce,
        writers: config.commitWriters,
        maxBytesInFlight: config.maxBytesInFlight,
        wakeups: config.wakeups,
      },
      log,
      metrics.writerObserver,
    );
    this.leases = new LeaseKeeper(
      store.leases,
      config,
      log,
      () => this.config.sources.length,
      member.id,
      member.version,
      'capture',
      config.buffer,
      metrics.leaseObserver,
    );
    // Rebalancing: the keeper picks a surplus source, its runner stops it gracefully.
    this.leases.handBack = (sourceId) => this.entries.get(sourceId)?.runner.handBack() ?? false;
    // Every store this process makes is fenced with the leases it holds.
    store.book = this.leases.book;
    this.bufferKeeper = new BufferKeeper(config.buffer, config, log, metrics.bufferKeeperObserver);
    metrics.retentionSeconds.set(config.retentionMs / 1000);
    metrics.retentionMaxSeconds.set(config.retentionMaxMs / 1000);
  }

  /** The runners, in the configuration's order. */
  get runners(): SourceRunner[] {
    return [...this.entries.values()].map((e) => e.runner);
  }

  /** Runs every source until stopped. A source that fails never stops the others. */
  run(): Promise<void> {
    this.running ??= this.runUntilStopped();
    return this.running;
  }
  private running: Promise<void> | null = null;

  private async runUntilStopped(): Promise<void> {
    await this.leases.start();
    this.bufferKeeper.start();
    for (const source of this.config.sources) this.start(source);
    await this.stopped;
    await Promise.all([...this.entries.values()].map((e) => e.done));
    await Promise.all([this.leases.stop(), this.bufferKeeper.stop()]);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.resolveStopped();
    // The others stop counting this process first: each lease it releases is taken at once. A
    // buffer that does not answer must not hold the stop up (the leases then expire).
    await Promise.race([this.leases.leave(), sleep(LEAVE_WAIT_MS)]);
    await this.reloading;
    await Promise.all(this.runners.map((r) => r.stop()));
    // And the rest of run(): the leases released and the member gone, maintenance ended, before
    // the caller closes the buffer's pools under them.
    await this.running?.catch(() => undefined);
  }

  /**
   * Takes the sources of `next` (a new, valid configuration); process-wide settings and the
   * buffer stay as they are until a restart. Resolves once the changes are in effect.
   */
  reload(next: Config): Promise<ReloadResult> {
    const done = this.reloading.then(() => this.apply(next));
    this.reloading = done.catch(() => undefined);
    return done;
  }

  private async apply(next: Config): Promise<ReloadResult> {
    const before = new Map(this.config.sources.map((s) => [s.id, s]));
    const after = new Map(next.sources.map((s) => [s.id, s]));
    const removed = [...before.keys()].filter((id) => !after.has(id));
    const restarted = [...after.keys()].filter(
      (id) => before.has(id) && JSON.stringify(before.get(id)) !== JSON.stringify(after.get(id)),
    );
    const added = [...after.keys()].filter((id) => !before.has(id));
    const unchanged = [...after.keys()].filter((id) => before.has(id) && !restarted.includes(id));
    if (this.stopping) return { added: [], removed: [], restarted: [], unchanged };

    // Stopped gracefully: what is in flight is stored and its final position confirmed.
    await Promise.all(
      [...removed, ...restarted].map(async (id) => {
        const entry = this.entries.get(id);
        if (!entry) return;
        await entry.runner.stop();
        await entry.done;
        this.entries.delete(id);
        await this.threads.remove(id);
        if (removed.includes(id)) this.metrics.removeSource(id);
      }),
    );
    this.config = { ...this.config, sources: next.sources };
    if (this.stopping) return { added: [], removed, restarted: [], unchanged };
    for (const id of [...restarted, ...added]) this.start(after.get(id)!);
    // /readyz and the status follow the new file's order.
    const ordered = next.sources.map((s) => [s.id, this.entries.get(s.id)!] as const);
    this.entries.clear();
    for (const [id, entry] of ordered) this.entries.set(id, entry);
    return { added, removed, restarted, unchanged };
  }

  private start(source: SourceConfig): void {
    const log = this.log.child({ source: source.id });
    const runner = new SourceRunner(
      source,
      this.config,
      this.threads,
      this.store,
      this.writer,
      this.leases,
      this.metrics,
      log,
      this.startedAt,
      this.reportFatal,
    );
    const done = runner.run().catch((error: unknown) => {
      // run() does not reject: a failed source is retried. Anything else is a bug to see.
      log.error({ err: error }, 'source runner ended with an error');
    });
    this.entries.set(source.id, { runner, done });
  }
}
