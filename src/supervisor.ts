/**
 * The supervisor: one reader thread per source (piscina), one writer per source that stores the
 * reader's batches in the buffer, and a restart loop with backoff around both.
 */
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { setTimeout as sleep } from 'node:timers/promises';
import pRetry from 'p-retry';
import { Piscina } from 'piscina';
import type { Config, SourceConfig } from './config.js';
import { classifyBufferError, isFatal, ReaderError } from './errors.js';
import { oneLine } from './exit.js';
import type { Logger } from './logger.js';
import { lsnToNumber, parseLsn } from './lsn.js';
import type { Metrics } from './metrics.js';
import type {
  BatchMessage,
  ReaderResult,
  ReaderTask,
  SupervisorMessage,
  WorkerMessage,
} from './protocol.js';
import type { BufferStore, Checkpoint } from './buffer/store.js';

/** A reader that ran this long before failing has earned a fresh backoff cycle. */
const HEALTHY_RUN_MS = 60_000;
/** Coalesce at most this much queued data into one buffer transaction. */
const MAX_GROUP_BYTES = 64 * 1024 * 1024;
/** After asking a reader to abort, wait this long before terminating its thread. */
const ABORT_GRACE_MS = 5_000;

export type SourceState = 'starting' | 'streaming' | 'backoff' | 'stopping' | 'stopped' | 'failed';

export class Supervisor {
  readonly runners: SourceRunner[];

  constructor(
    config: Config,
    private readonly pool: Piscina,
    store: BufferStore,
    metrics: Metrics,
    log: Logger,
    startedAt: number,
  ) {
    this.runners = config.sources.map(
      (source) =>
        new SourceRunner(
          source,
          config,
          this.pool,
          store,
          metrics,
          log.child({ source: source.id }),
          startedAt,
        ),
    );
  }

  /** Runs every source until stopped; resolves with the sources that failed fatally. */
  async run(): Promise<Array<{ source: string; error: Error }>> {
    const results = await Promise.allSettled(this.runners.map((r) => r.run()));
    const failures: Array<{ source: string; error: Error }> = [];
    results.forEach((result, i) => {
      if (result.status === 'rejected') {
        failures.push({ source: this.runners[i]!.source.id, error: result.reason as Error });
      }
    });
    return failures;
  }

  async stop(): Promise<void> {
    await Promise.all(this.runners.map((r) => r.stop()));
  }
}

/** One reader run: a thread reading the slot and the writer storing what it sends. */
class ReaderRun {
  private readonly channel = new MessageChannel();
  private readonly abortController = new AbortController();
  private readonly queue: BatchMessage[] = [];
  private writing = false;
  private aborted = false;
  private writeError: unknown = null;
  private onWriterFailed!: (error: unknown) => void;
  private readonly writerFailed = new Promise<never>((_, reject) => {
    this.onWriterFailed = reject;
  });
  readonly task: Promise<ReaderResult>;

  constructor(
    private readonly runner: SourceRunner,
    checkpoint: Checkpoint | null,
    pool: Piscina,
  ) {
    this.writerFailed.catch(() => undefined);
    const { source, config } = runner;
    this.channel.port1.on('message', (message: WorkerMessage) => this.onMessage(message));
    const task: ReaderTask = {
      source,
      checkpoint:
        checkpoint === null ? null : { lsn: checkpoint.lsn, confirmedLsn: checkpoint.confirmedLsn },
      checkpointIntervalMs: config.checkpointIntervalMs,
      sourceTimeoutMs: config.sourceTimeoutMs,
      batchMaxRows: config.batchMaxRows,
      batchMaxBytes: config.batchMaxBytes,
      batchMaxWaitMs: config.batchMaxWaitMs,
      maxInFlightBatches: config.maxInFlightBatches,
      logLevel: config.logLevel,
      buffer: runner.store.identity,
      port: this.channel.port2,
    };
    this.task = pool.run(task, {
      transferList: [this.channel.port2 as unknown as MessagePort],
      signal: this.abortController.signal,
    }) as Promise<ReaderResult>;
    this.task.catch(() => undefined);
  }

  /** Resolves when the reader stopped cleanly; rejects with why it did not. */
  async wait(lockLost: Promise<never>): Promise<void> {
    try {
      const result = await Promise.race([this.task, this.writerFailed, lockLost]);
      if (result.error) throw new ReaderError(result.error);
    } catch (error) {
      await this.abort();
      throw error;
    } finally {
      this.channel.port1.close();
    }
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
    // From here on nothing more is stored from this run: batches still in the queue or still on
    // their way over the port are dropped, never written after an earlier one was dropped (that
    // would move the checkpoint past a gap). The next run re-reads them from the checkpoint.
    this.aborted = true;
    this.queue.length = 0;
    this.send({ type: 'abort' });
    const timer = setTimeout(() => this.abortController.abort(), ABORT_GRACE_MS);
    await this.task.catch(() => undefined);
    clearTimeout(timer);
    while (this.writing) await new Promise((r) => setTimeout(r, 10));
  }

  private send(message: SupervisorMessage): void {
    try {
      this.channel.port1.postMessage(message);
    } catch {
      // Port already closed: the thread is gone.
    }
  }

  private onMessage(message: WorkerMessage): void {
    const { metrics, source, log } = this.runner;
    const labels = { source: source.id };
    switch (message.type) {
      case 'ready':
        this.runner.setState('streaming');
        log.info(
          {
            startLsn: message.startLsn,
            slotCreated: message.slotCreated,
            publicationCreated: message.publicationCreated,
            serverVersion: message.serverVersion,
          },
          'reader ready',
        );
        break;
      case 'batch':
        if (this.writeError !== null || this.aborted) return;
        this.queue.push(message);
        metrics.queuedBatches.set(labels, this.queue.length);
        void this.drain();
        break;
      case 'record':
        void this.recordConfirmable(message.lsn);
        break;
      case 'progress':
        if (message.confirmedLsn !== null) {
          this.runner.confirmedLsn = message.confirmedLsn;
          metrics.confirmedLsn.set(labels, lsnToNumber(parseLsn(message.confirmedLsn)));
        }
        if (message.serverWalEnd !== null) {
          this.runner.serverWalEnd = parseLsn(message.serverWalEnd);
          metrics.serverWalEnd.set(labels, lsnToNumber(this.runner.serverWalEnd));
          this.runner.updateLag();
        }
        break;
    }
  }

  /** Records a position the reader wants to confirm past the checkpoint, then lets it. */
  private async recordConfirmable(lsn: string): Promise<void> {
    if (this.writeError !== null || this.aborted) return;
    const { source, store } = this.runner;
    try {
      await store.recordConfirmable(source.id, source.slot, lsn);
      this.send({ type: 'recorded', lsn });
    } catch (error) {
      this.failWriter(error, 'recording a confirmable position in the buffer failed');
    }
  }

  private failWriter(error: unknown, what: string): void {
    if (this.writeError !== null) return;
    this.writeError = error;
    this.queue.length = 0;
    this.runner.metrics.queuedBatches.set({ source: this.runner.source.id }, 0);
    const buffer = classifyBufferError(error);
    this.runner.log.error({ err: error, problem: buffer.problem }, `${what}: ${buffer.summary}`);
    this.onWriterFailed(error);
  }

  /** Stores queued batches in order, several per buffer transaction when they pile up. */
  private async drain(): Promise<void> {
    if (this.writing) return;
    this.writing = true;
    const { metrics, source, store, log } = this.runner;
    const labels = { source: source.id };
    try {
      while (this.queue.length > 0 && this.writeError === null && !this.aborted) {
        const group: BatchMessage[] = [];
        let bytes = 0;
        while (
          this.queue.length > 0 &&
          (group.length === 0 || bytes + this.queue[0]!.data.byteLength <= MAX_GROUP_BYTES)
        ) {
          const next = this.queue.shift()!;
          group.push(next);
          bytes += next.data.byteLength;
        }
        metrics.queuedBatches.set(labels, this.queue.length);
        const started = performance.now();
        const stored = await store.storeBatches(source.id, source.slot, group);
        const now = Date.now();
        metrics.bufferCommitSeconds.observe(labels, (performance.now() - started) / 1000);
        metrics.bufferCommits.inc(labels);
        metrics.batches.inc(labels, group.length);
        metrics.bufferBytes.inc(labels, bytes);
        for (const batch of group) {
          metrics.events.inc({ ...labels, operation: 'INSERT' }, batch.counts.insert);
          metrics.events.inc({ ...labels, operation: 'UPDATE' }, batch.counts.update);
          metrics.events.inc({ ...labels, operation: 'DELETE' }, batch.counts.delete);
          metrics.events.inc({ ...labels, operation: 'TRUNCATE' }, batch.counts.truncate);
          metrics.transactions.inc(labels, batch.transactions);
        }
        const last = group[group.length - 1]!;
        const lastCommit = [...group].reverse().find((b) => b.checkpointCommitTimeMs !== null);
        if (stored.checkpointLsn !== null) this.runner.noteCheckpoint(stored.checkpointLsn);
        if (lastCommit?.checkpointCommitTimeMs != null) {
          metrics.lastCommitTimestamp.set(labels, lastCommit.checkpointCommitTimeMs / 1000);
          metrics.commitLagSeconds.observe(
            labels,
            Math.max(0, now - lastCommit.checkpointCommitTimeMs) / 1000,
          );
          this.runner.lastStoredAt = now;
        }
        if (stored.schemaVersionsAdded > 0) {
          log.info({ versions: stored.schemaVersionsAdded }, 'schema versions recorded');
        }
        // Only now, with the buffer transaction committed, may the reader confirm this far.
        this.send({ type: 'durable', seq: last.seq, lsn: stored.checkpointLsn });
      }
    } catch (error) {
      this.failWriter(error, 'storing a batch in the buffer failed');
    } finally {
      this.writing = false;
    }
  }
}

/** The backoff before attempt n+1: doubling from min to max, with jitter (50-100 %). */
export function backoffDelay(attempt: number, minMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt - 1, 30));
  return Math.round(ceiling * (0.5 + Math.random() * 0.5));
}

/** What /readyz and the status report say about one source. */
export interface SourceReport {
  readonly source: string;
  readonly ready: boolean;
  readonly state: SourceState;
  readonly stateSeconds: number;
  /** How long the source has not been streaming; null while it streams. */
  readonly notStreamingSeconds: number | null;
  /** Failed attempts since it last streamed. */
  readonly attempts: number;
  readonly nextAttemptAt: string | null;
  readonly lastError: string | null;
  readonly lastErrorCode: string | null;
  readonly lastErrorAt: string | null;
  readonly lastErrorDetails: Readonly<Record<string, unknown>> | null;
  readonly checkpointLsn: string | null;
  readonly confirmedLsn: string | null;
  readonly lastStoredAt: string | null;
}

export class SourceRunner {
  state: SourceState = 'starting';
  lastError: string | null = null;
  private lastErrorCode: string | null = null;
  private lastErrorAt: number | null = null;
  private lastErrorDetails: Readonly<Record<string, unknown>> | null = null;
  checkpointLsn: string | null = null;
  confirmedLsn: string | null = null;
  serverWalEnd = 0n;
  lastStoredAt: number | null = null;
  private stateSince = Date.now();
  /**
   * Since when the source has not been capturing: its first failure after it last streamed
   * steadily (or the process start). Null while it streams steadily. Retries do not reset it, and
   * neither do runs that reach streaming and fail again within `steadyMs`: a source that keeps
   * reconnecting and failing (a read-only buffer, a flapping network) is not capturing either.
   */
  private outageSince: number | null;
  private streamingSince: number | null = null;
  /** Streaming this long ends an outage (at most half the grace, so one hiccup never shows). */
  private readonly steadyMs: number;
  private attempts = 0;
  private nextAttemptAt: number | null = null;
  private stopping = false;
  private current: ReaderRun | null = null;
  private readonly retryAbort = new AbortController();

  constructor(
    readonly source: SourceConfig,
    readonly config: Config,
    private readonly pool: Piscina,
    readonly store: BufferStore,
    readonly metrics: Metrics,
    readonly log: Logger,
    /** When the process started: a source that has never streamed has not streamed since then. */
    startedAt: number,
  ) {
    this.outageSince = startedAt;
    this.steadyMs = Math.min(HEALTHY_RUN_MS, config.readinessGraceMs / 2);
    metrics.initSource(source.id);
    metrics.sourceState.set({ source: source.id, state: this.state }, 1);
  }

  setState(state: SourceState): void {
    if (this.state === state) return;
    const labels = { source: this.source.id };
    this.metrics.sourceState.set({ ...labels, state: this.state }, 0);
    this.metrics.sourceState.set({ ...labels, state }, 1);
    const now = Date.now();
    this.settle(now);
    this.state = state;
    this.stateSince = now;
    if (state === 'streaming') {
      this.streamingSince = now;
      this.nextAttemptAt = null;
      this.metrics.nextAttemptTimestamp.set(labels, 0);
    } else {
      this.streamingSince = null;
      this.outageSince ??= now;
    }
    this.metrics.readerUp.set(labels, state === 'streaming' ? 1 : 0);
  }

  /** Ends the outage once the source has streamed steadily. */
  private settle(now: number): void {
    if (
      this.outageSince !== null &&
      this.state === 'streaming' &&
      this.streamingSince !== null &&
      now - this.streamingSince >= this.steadyMs
    ) {
      this.outageSince = null;
      this.attempts = 0;
      this.metrics.consecutiveFailures.set({ source: this.source.id }, 0);
    }
  }

  /** The checkpoint now stored in the buffer: for /readyz, the gauge and the lag. */
  noteCheckpoint(lsn: string): void {
    this.checkpointLsn = lsn;
    this.metrics.checkpointLsn.set({ source: this.source.id }, lsnToNumber(parseLsn(lsn)));
    this.updateLag();
  }

  updateLag(): void {
    if (this.serverWalEnd === 0n) return;
    // Idle confirmations move the confirmed position past the checkpoint (WAL written elsewhere
    // holds nothing for us), so lag is measured from whichever is further.
    const checkpoint = this.checkpointLsn === null ? 0n : parseLsn(this.checkpointLsn);
    const confirmed = this.confirmedLsn === null ? 0n : parseLsn(this.confirmedLsn);
    const captured = confirmed > checkpoint ? confirmed : checkpoint;
    if (captured === 0n) return;
    const lag = this.serverWalEnd - captured;
    this.metrics.lagBytes.set({ source: this.source.id }, lsnToNumber(lag > 0n ? lag : 0n));
  }

  /** Seconds the source has not been capturing (0 while it streams steadily). */
  notStreamingSeconds(now = Date.now()): number {
    this.settle(now);
    return this.outageSince === null ? 0 : (now - this.outageSince) / 1000;
  }

  /**
   * Ready while streaming steadily, and for a grace period after it stopped (restarts are
   * normal: server restarts, failovers), however many attempts it makes meanwhile. A source
   * that failed for good is never ready.
   */
  isReady(now = Date.now()): boolean {
    if (this.state === 'failed' || this.state === 'stopped') return false;
    this.settle(now);
    if (this.outageSince === null) return true;
    return now - this.outageSince < this.config.readinessGraceMs;
  }

  report(now = Date.now()): SourceReport {
    const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
    return {
      source: this.source.id,
      ready: this.isReady(now),
      state: this.state,
      stateSeconds: Math.round((now - this.stateSince) / 1000),
      notStreamingSeconds:
        this.notStreamingSeconds(now) === 0 ? null : Math.round(this.notStreamingSeconds(now)),
      attempts: this.attempts,
      nextAttemptAt: this.state === 'backoff' ? iso(this.nextAttemptAt) : null,
      lastError: this.lastError,
      lastErrorCode: this.lastErrorCode,
      lastErrorAt: iso(this.lastErrorAt),
      lastErrorDetails: this.lastErrorDetails,
      checkpointLsn: this.checkpointLsn,
      confirmedLsn: this.confirmedLsn,
      lastStoredAt: iso(this.lastStoredAt),
    };
  }

  /** Runs the source until stopped; rejects if it fails fatally. */
  async run(): Promise<void> {
    const signal = this.retryAbort.signal;
    while (!this.stopping) {
      let freshCycle = false;
      try {
        await pRetry(
          async () => {
            const started = Date.now();
            try {
              await this.runOnce();
            } catch (error) {
              if (!this.stopping && !isFatal(error) && Date.now() - started >= HEALTHY_RUN_MS) {
                this.noteFailure(error, 1, this.config.restartMinDelayMs);
                freshCycle = true; // healthy for a while: restart with a fresh backoff
                return;
              }
              throw error;
            }
          },
          {
            retries: Infinity,
            // The wait between attempts is ours (below), so that the log, /readyz and the
            // metrics can say when the next attempt is.
            minTimeout: 0,
            maxTimeout: 0,
            signal,
            onFailedAttempt: async ({ error, attemptNumber }) => {
              if (this.stopping) return;
              if (isFatal(error)) {
                this.noteFailure(error, attemptNumber, null);
                return;
              }
              const delay = backoffDelay(
                attemptNumber,
                this.config.restartMinDelayMs,
                this.config.restartMaxDelayMs,
              );
              this.noteFailure(error, attemptNumber, delay);
              this.setState('backoff');
              await sleep(delay, undefined, { signal });
            },
            shouldRetry: ({ error }) => !this.stopping && !isFatal(error),
          },
        );
      } catch (error) {
        if (this.stopping) break;
        this.setState('failed');
        this.metrics.readerFailures.inc({ source: this.source.id, kind: 'fatal' });
        this.log.error(
          { err: error, code: this.lastErrorCode, details: this.lastErrorDetails },
          `source stopped; a person must act: ${oneLine(this.lastError ?? String(error))}`,
        );
        throw error;
      }
      if (freshCycle && !this.stopping) {
        this.nextAttemptAt = Date.now() + this.config.restartMinDelayMs;
        await sleep(this.config.restartMinDelayMs, undefined, { signal }).catch(() => undefined);
      }
    }
    this.setState('stopped');
  }

  private noteFailure(error: unknown, attempt: number, delayMs: number | null): void {
    const labels = { source: this.source.id };
    const e = error as { message?: unknown; code?: unknown; details?: unknown } | null;
    this.lastError = error instanceof Error ? error.message : String(error);
    this.lastErrorCode = typeof e?.code === 'string' ? e.code : null;
    this.lastErrorDetails =
      typeof e?.details === 'object' && e.details !== null
        ? (e.details as Record<string, unknown>)
        : null;
    this.lastErrorAt = Date.now();
    this.metrics.lastErrorTimestamp.set(labels, this.lastErrorAt / 1000);
    this.attempts++;
    this.metrics.consecutiveFailures.set(labels, this.attempts);
    if (delayMs === null) return; // fatal: reported once by run()
    this.nextAttemptAt = Date.now() + delayMs;
    this.metrics.nextAttemptTimestamp.set(labels, this.nextAttemptAt / 1000);
    this.metrics.readerFailures.inc({ ...labels, kind: 'retryable' });
    this.metrics.readerRestarts.inc(labels);
    this.log.warn(
      {
        err: error,
        attempt,
        retryInMs: delayMs,
        nextAttemptAt: new Date(this.nextAttemptAt).toISOString(),
        notStreamingSeconds: Math.round(this.notStreamingSeconds()),
      },
      `reader failed (${oneLine(this.lastError)}); next attempt in ${formatDelay(delayMs)}`,
    );
  }

  private async runOnce(): Promise<void> {
    this.setState('starting');
    const lock = await this.store.lockSource(this.source.id);
    if (!lock) {
      throw new Error(
        `another Philotes process is capturing source "${this.source.id}" into this buffer (it holds the source's lock); retrying until it stops`,
      );
    }
    try {
      await this.runLocked(lock.lost);
    } finally {
      await lock.release();
    }
  }

  private async runLocked(lockLost: Promise<never>): Promise<void> {
    const checkpoint = await this.store.prepareSource(this.source.id);
    if (checkpoint) this.noteCheckpoint(checkpoint.lsn);
    if (this.stopping) return;
    this.log.info({ checkpoint: checkpoint?.lsn ?? null }, 'starting reader');
    const run = new ReaderRun(this, checkpoint, this.pool);
    this.current = run;
    try {
      await run.wait(lockLost);
      this.log.info('reader stopped cleanly');
    } finally {
      this.current = null;
      if (this.state === 'streaming') this.setState('starting');
    }
    if (!this.stopping) throw new Error('reader returned without being asked to stop');
  }

  /** Graceful: the reader stores what is in flight, confirms it, and returns. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.setState('stopping');
    this.retryAbort.abort();
    const run = this.current;
    if (run) {
      this.log.info('stopping reader');
      run.requestStop();
      await run.task.catch(() => undefined);
    }
  }
}

function formatDelay(ms: number): string {
  return ms < 1000 ? `${ms}ms` : `${(ms / 1000).toFixed(1)}s`;
}
