/**
 * One source under supervision: runs reader after reader with jittered backoff (p-retry) until
 * stopped or until an error retrying cannot fix; keeps the source's state, readiness and
 * metrics from what its runs report.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { supports } from '../common/server-features.js';
import pRetry from 'p-retry';
import type { ReaderThreads } from './reader-pool.js';
import type { Config, SourceConfig } from '../common/config.js';
import { fixFor, isFatalCode, policyOf } from '../common/error-policy.js';
import { isFatal } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import { lsnToNumber, parseLsn } from '../common/lsn.js';
import {
  readerSettings,
  type ProgressMessage,
  type ReadyMessage,
  type SlotStatusMessage,
} from '../common/protocol.js';
import { oneLine } from '../common/exit.js';
import type { Metrics } from '../http/metrics.js';
import { asFencedError, type BufferStore } from '../buffer/store.js';
import { LeaseLostError, type LeaseKeeper } from './lease-keeper.js';
import type { BatchWriter, StoredGroupReport } from './batch-writer.js';
import { ReaderRun, type ReaderRunListener } from './reader-run.js';
import { PublicationKeeper } from './publication-keeper.js';
import { StatusReporter } from './status-reporter.js';
import { isLostChanges, recoverLostSlot } from './lost-slot-recovery.js';
import {
  SNAPSHOT_TABLE_STATES,
  SnapshotProgressTracker,
  type SnapshotReport,
} from './snapshot-progress.js';

/** How often a streaming source looks in the buffer for a snapshot asked for (on demand). */
const SNAPSHOT_POLL_MS = 5_000;

/** A reader that ran this long before failing has earned a fresh backoff cycle. */
const HEALTHY_RUN_MS = 60_000;

export type SourceState =
  | 'starting'
  | 'streaming'
  | 'backoff'
  | 'stopping'
  | 'stopped'
  | 'failed'
  /** Another process holds the source's lease and captures it (or this one has its share); this one waits. */
  | 'standby';

/** Every state, for the metrics' label values. */
export const SOURCE_STATES: readonly SourceState[] = [
  'starting',
  'streaming',
  'backoff',
  'stopping',
  'stopped',
  'failed',
  'standby',
];

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
  /** For a fatal code: what a person does, for this source, and where the docs explain it. */
  readonly lastErrorFix: string | null;
  readonly lastErrorDocs: string | null;
  readonly lastErrorAt: string | null;
  readonly lastErrorDetails: Readonly<Record<string, unknown>> | null;
  readonly checkpointLsn: string | null;
  readonly confirmedLsn: string | null;
  readonly lastStoredAt: string | null;
  /** The WAL the source holds for the slot, as last polled (null before the first poll). */
  readonly retainedWalBytes: number | null;
  /** When the slot was last polled (every 15 s while streaming). */
  readonly slotPolledAt: string | null;
  readonly walStatus: string | null;
  /** WAL between the server's end and what is captured (null until both are known). */
  readonly lagBytes: number | null;
  /** Behind: the age of the last stored source commit; 0 when caught up; null when unknown. */
  readonly lagSeconds: number | null;
  /** Events stored per second over the last 10 seconds. */
  readonly eventsPerSecond: number;
  /** Reader restarts since the process started. */
  readonly restarts: number;
  /** The snapshot running, or the last one this process ran; null if none. */
  readonly snapshot: SnapshotReport | null;
  /**
   * Published tables without a replica identity, whose UPDATE and DELETE the source refuses (a
   * publication Philotes made; null until looked at, or for the user's own).
   */
  readonly failingTables: readonly string[] | null;
  /**
   * The member (a Philotes process: host:pid:token) that holds the source's lease, as this
   * process last saw it: itself while it captures the source; null when nobody does, or not yet
   * known.
   */
  readonly owner: string | null;
}

/**
 * When the server's WAL end (as the stream reports it) passed each position: samples taken as the
 * reader reports progress. The lag in seconds is how long ago the end first went past the stored
 * position, which is what lag means to a consumer (how old the newest change it cannot see yet
 * may be) and, unlike the age of the last stored commit, does not grow while the source is idle.
 */
export class WalClock {
  private readonly samples: Array<{ readonly at: number; readonly end: bigint }> = [];

  constructor(private readonly capacity = 1_000) {}

  note(end: bigint, at: number): void {
    const last = this.samples.at(-1);
    if (last !== undefined && last.end >= end) return;
    this.samples.push({ at, end });
    if (this.samples.length > this.capacity) this.samples.shift();
  }

  /** Seconds since the end first went past `lsn`; 0 if it has not; null with no sample. */
  secondsSince(lsn: bigint, now: number): number | null {
    if (this.samples.length === 0) return null;
    let i = this.samples.length - 1;
    if (this.samples[i]!.end <= lsn) return 0;
    while (i > 0 && this.samples[i - 1]!.end > lsn) i--;
    // samples[i] is the first seen past lsn (or the oldest kept: at least this long ago).
    return Math.max(0, Math.round((now - this.samples[i]!.at) / 1000));
  }
}

/** Events stored per second, over a sliding window of whole seconds. */
class RateWindow {
  private readonly buckets = new Map<number, number>();
  constructor(private readonly seconds = 10) {}

  add(count: number, now = Date.now()): void {
    const second = Math.floor(now / 1000);
    this.buckets.set(second, (this.buckets.get(second) ?? 0) + count);
    for (const key of this.buckets.keys())
      if (key <= second - this.seconds) this.buckets.delete(key);
  }

  rate(now = Date.now()): number {
    const second = Math.floor(now / 1000);
    let total = 0;
    // The current, unfinished second is left out: it would read low.
    for (const [key, count] of this.buckets) {
      if (key < second && key >= second - this.seconds) total += count;
    }
    return Math.round((total / this.seconds) * 10) / 10;
  }
}

export class SourceRunner implements ReaderRunListener {
  state: SourceState = 'starting';
  private lastError: string | null = null;
  private lastErrorCode: string | null = null;
  private lastErrorAt: number | null = null;
  private lastErrorDetails: Readonly<Record<string, unknown>> | null = null;
  private checkpointLsn: string | null = null;
  private confirmedLsn: string | null = null;
  private serverWalEnd = 0n;
  private lastStoredAt: number | null = null;
  private slotStatus: SlotStatusMessage | null = null;
  private slotPolledAt: number | null = null;
  private lagBytes: bigint | null = null;
  private capturedLsn = 0n;
  private readonly walClock = new WalClock();
  /** Source commit time of the last stored transaction (ms since epoch). */
  private lastSourceCommitMs: number | null = null;
  private readonly eventRate = new RateWindow();
  private restarts = 0;
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
  private readonly snapshot = new SnapshotProgressTracker();
  private polling = false;
  /** The fatal error last said out loud (the same one is not repeated every retry). */
  private fatalReported: string | null = null;
  private stopping = false;
  /** The reader is stopping to hand the lease to another member (rebalancing), not failing. */
  private handingBack = false;
  private current: ReaderRun | null = null;
  private readonly retryAbort = new AbortController();
  private readonly keeper: PublicationKeeper;
  private readonly reporter: StatusReporter;

  constructor(
    readonly source: SourceConfig,
    private readonly config: Config,
    private readonly threads: ReaderThreads,
    private readonly store: BufferStore,
    private readonly writer: BatchWriter,
    private readonly leases: LeaseKeeper,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    /** When the process started: a source that has never streamed has not streamed since then. */
    startedAt: number,
    /** Says a fatal failure where a person sees it (stderr), once per distinct reason. */
    private readonly reportFatal: (source: string, message: string) => void = () => undefined,
  ) {
    this.outageSince = startedAt;
    this.keeper = new PublicationKeeper(source, store, log);
    this.reporter = new StatusReporter(
      store,
      source.id,
      () => ({
        state: this.state,
        since: new Date(this.outageSince ?? this.stateSince),
        lastError: this.lastError,
        lastErrorCode: this.lastErrorCode,
        lastErrorAt: this.lastErrorAt === null ? null : new Date(this.lastErrorAt),
      }),
      log,
    );
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
    } else if (state === 'standby') {
      // Another process captures the source: no outage of ours.
      this.streamingSince = null;
      this.outageSince = null;
    } else {
      this.streamingSince = null;
      this.outageSince ??= now;
    }
    this.metrics.readerUp.set(labels, state === 'streaming' ? 1 : 0);
    this.reporter.changed();
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

  // ---- what a reader run reports (ReaderRunListener) ----

  ready(message: ReadyMessage): void {
    this.setState('streaming');
    this.metrics.sourceDiverged.set({ source: this.source.id }, 0);
    this.log.info(
      {
        startLsn: message.startLsn,
        slotCreated: message.slotCreated,
        publicationCreated: message.publicationCreated,
        serverVersion: message.serverVersion,
      },
      'reader ready',
    );
    const snapshot = this.snapshot.report();
    if (!supports(message.serverVersion, 'logicalMessages') && snapshot?.state === 'running') {
      // The reader cannot copy (no logical messages before 14; it says so): the record ends
      // here rather than stay running for ever.
      this.snapshot.begin(null);
      this.reportSnapshotTables();
      this.store
        .endSnapshot(this.source.id, snapshot.id, 'unsupported')
        .catch((error: unknown) =>
          this.log.warn({ err: error, snapshot: snapshot.id }, 'could not end the snapshot record'),
        );
    }
  }

  slot(message: SlotStatusMessage): void {
    this.slotStatus = message;
    this.slotPolledAt = Date.now();
    this.metrics.recordSlot(this.source.id, message);
  }

  progress({ confirmedLsn, serverWalEnd, capturedLsn }: ProgressMessage): void {
    const labels = { source: this.source.id };
    if (confirmedLsn !== null) {
      this.confirmedLsn = confirmedLsn;
      this.metrics.confirmedLsn.set(labels, lsnToNumber(parseLsn(confirmedLsn)));
    }
    if (capturedLsn !== null) this.capturedLsn = parseLsn(capturedLsn);
    if (serverWalEnd !== null) {
      this.serverWalEnd = parseLsn(serverWalEnd);
      this.walClock.note(this.serverWalEnd, Date.now());
      this.metrics.serverWalEnd.set(labels, lsnToNumber(this.serverWalEnd));
      this.updateLag();
    }
  }

  queued(length: number): void {
    this.metrics.queuedBatches.set({ source: this.source.id }, length);
  }

  stored(report: StoredGroupReport): void {
    this.metrics.recordStored(this.source.id, report);
    const progress = report.batches.flatMap((b) => b.snapshotProgress);
    if (progress.length > 0) {
      if (this.snapshot.apply(progress)) {
        const s = this.snapshot.report()!;
        this.log.info({ snapshot: s.id, rows: s.rows, tables: s.tables }, 'snapshot finished');
      }
      this.reportSnapshotTables();
    }
    if (report.stored.checkpointLsn !== null) this.noteCheckpoint(report.stored.checkpointLsn);
    if (report.batches.some((b) => b.checkpointCommitTimeMs !== null)) {
      this.lastStoredAt = report.storedAt;
    }
    for (const batch of report.batches) {
      if (batch.checkpointCommitTimeMs !== null)
        this.lastSourceCommitMs = batch.checkpointCommitTimeMs;
      this.eventRate.add(batch.rows, report.storedAt);
    }
    if (report.stored.schemaVersionsAdded > 0) {
      this.log.info({ versions: report.stored.schemaVersionsAdded }, 'schema versions recorded');
    }
  }

  private reportSnapshotTables(): void {
    const tables = this.snapshot.report()?.tables;
    for (const state of SNAPSHOT_TABLE_STATES)
      this.metrics.snapshotTables.set({ source: this.source.id, state }, tables?.[state] ?? 0);
  }

  /** The checkpoint now stored in the buffer: for /readyz, the gauge and the lag. */
  private noteCheckpoint(lsn: string): void {
    this.checkpointLsn = lsn;
    this.metrics.checkpointLsn.set({ source: this.source.id }, lsnToNumber(parseLsn(lsn)));
    this.updateLag();
  }

  /**
   * How far this source's changes are stored: the checkpoint, the confirmed position, or where
   * the reader last found nothing of its database pending (WAL written by other databases of the
   * server holds nothing for it), whichever is further.
   */
  private captured(): bigint {
    const checkpoint = this.checkpointLsn === null ? 0n : parseLsn(this.checkpointLsn);
    const confirmed = this.confirmedLsn === null ? 0n : parseLsn(this.confirmedLsn);
    let captured = confirmed > checkpoint ? confirmed : checkpoint;
    if (this.capturedLsn > captured) captured = this.capturedLsn;
    return captured;
  }

  private updateLag(): void {
    if (this.serverWalEnd === 0n) return;
    // Idle confirmations move the confirmed position past the checkpoint (WAL written elsewhere
    // holds nothing for us), so lag is measured from whichever is further.
    const captured = this.captured();
    if (captured === 0n) return;
    const lag = this.serverWalEnd - captured;
    this.lagBytes = lag > 0n ? lag : 0n;
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
   * that failed for good is never ready. A standby is: the process that holds the source's lease
   * captures it, and this one is doing what it should, waiting to take over.
   */
  isReady(now = Date.now()): boolean {
    if (this.state === 'failed' || this.state === 'stopped') return false;
    if (this.state === 'standby') return true;
    this.settle(now);
    if (this.outageSince === null) return true;
    return now - this.outageSince < this.config.readinessGraceMs;
  }

  report(now = Date.now()): SourceReport {
    const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
    const notStreaming = this.notStreamingSeconds(now);
    return {
      source: this.source.id,
      ready: this.isReady(now),
      state: this.state,
      stateSeconds: Math.round((now - this.stateSince) / 1000),
      notStreamingSeconds: notStreaming === 0 ? null : Math.round(notStreaming),
      attempts: this.attempts,
      nextAttemptAt:
        this.state === 'backoff' || this.state === 'failed' ? iso(this.nextAttemptAt) : null,
      lastError: this.lastError,
      lastErrorCode: this.lastErrorCode,
      lastErrorFix: fixFor(this.lastErrorCode, this.source),
      lastErrorDocs: isFatalCode(this.lastErrorCode) ? policyOf(this.lastErrorCode).docs : null,
      lastErrorAt: iso(this.lastErrorAt),
      lastErrorDetails: this.lastErrorDetails,
      checkpointLsn: this.checkpointLsn,
      confirmedLsn: this.confirmedLsn,
      lastStoredAt: iso(this.lastStoredAt),
      retainedWalBytes: this.slotStatus?.retainedWalBytes ?? null,
      slotPolledAt: iso(this.slotPolledAt),
      walStatus: this.slotStatus?.walStatus ?? null,
      lagBytes: this.lagBytes === null ? null : Number(this.lagBytes),
      lagSeconds:
        this.lagBytes === null
          ? null
          : this.lagBytes === 0n
            ? 0
            : this.walClock.secondsSince(this.captured(), now),
      eventsPerSecond: this.eventRate.rate(now),
      restarts: this.restarts,
      snapshot: this.snapshot.report(),
      failingTables: this.keeper.report().failingTables,
      owner: this.leases.ownerOf(this.source.id),
    };
  }

  /** Runs the source until stopped: a failed source is retried at the slowest pace. */
  async run(): Promise<void> {
    const signal = this.retryAbort.signal;
    this.reporter.start();
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
        this.noteFatal(error);
        // A person may fix the cause (a grant, a password, `reset-source` for a gap) without
        // restarting Philotes, and the other sources go on: try again, at the slowest pace.
        const delay = this.config.restartMaxDelayMs;
        this.nextAttemptAt = Date.now() + delay;
        this.metrics.nextAttemptTimestamp.set(
          { source: this.source.id },
          this.nextAttemptAt / 1000,
        );
        await sleep(delay, undefined, { signal }).catch(() => undefined);
        continue;
      }
      if (freshCycle && !this.stopping) {
        this.nextAttemptAt = Date.now() + this.config.restartMinDelayMs;
        await sleep(this.config.restartMinDelayMs, undefined, { signal }).catch(() => undefined);
      }
    }
    this.setState('stopped');
    await this.reporter.stop();
  }

  /**
   * The source has failed for a reason retrying cannot fix: `failed`, counted, and said loudly
   * (an error line, and one line on stderr) the first time, and again only if the reason changes.
   */
  private noteFatal(error: unknown): void {
    const repeated = this.state === 'failed' && this.fatalReported === this.lastError;
    this.setState('failed');
    const diverged =
      this.lastErrorCode === 'SOURCE_DIVERGED' || this.lastErrorCode === 'SOURCE_REPLACED';
    this.metrics.sourceDiverged.set({ source: this.source.id }, diverged ? 1 : 0);
    this.metrics.readerFailures.inc({ source: this.source.id, kind: 'fatal' });
    const message = oneLine(this.lastError ?? String(error));
    if (repeated) {
      this.log.debug({ code: this.lastErrorCode, attempts: this.attempts }, 'source still failing');
      return;
    }
    this.fatalReported = this.lastError;
    this.log.error(
      { err: error, code: this.lastErrorCode, details: this.lastErrorDetails },
      `source stopped; a person must act (retried every ${formatDelay(this.config.restartMaxDelayMs)} meanwhile): ${message}`,
    );
    this.reportFatal(this.source.id, message);
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
    this.reporter.changed();
    this.metrics.consecutiveFailures.set(labels, this.attempts);
    // A fatal failure is tried again too (slowly, by run()): every failure is a restart.
    this.metrics.readerRestarts.inc(labels);
    this.restarts++;
    if (delayMs === null) return; // fatal: reported once by run()
    this.nextAttemptAt = Date.now() + delayMs;
    this.metrics.nextAttemptTimestamp.set(labels, this.nextAttemptAt / 1000);
    this.metrics.readerFailures.inc({ ...labels, kind: 'retryable' });
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
    let held = await this.leases.acquire(this.source.id);
    if (!held) {
      // Not a failure: another process captures the source (a second replica, a rolling
      // deploy), or this one has its fair share. It stands by, ready by the documented rule,
      // and takes over when the lease is free or expires.
      this.setState('standby');
      this.log.info(
        `another Philotes process captures source "${this.source.id}" into this buffer (it holds the source's lease), or this process has its share of the fleet: standing by`,
      );
      while (held === null && !this.stopping) {
        await this.leases.waitForChance(this.source.id, this.retryAbort.signal);
        if (this.stopping) return;
        held = await this.leases.acquire(this.source.id);
      }
      if (held === null) return;
      this.log.info('the source is free: taking over');
      this.setState('starting');
    }
    try {
      await this.runLeased(held.lost);
      if (this.handingBack) {
        this.log.info('handed the source back: its reader stored and confirmed what it had');
        this.setState('standby');
      }
    } catch (error) {
      // The lease is gone (another process took the source, or it could not be renewed in
      // time): not a failure of the source. Stand by; the next attempt waits for the lease.
      const fenced = asFencedError(error);
      if (!(error instanceof LeaseLostError) && fenced === null) throw error;
      if (fenced !== null) this.leases.fenced(this.source.id);
      this.log.warn(`${(error as Error).message}: the reader stopped; standing by for the lease`);
      this.setState('standby');
    } finally {
      this.handingBack = false;
      await this.leases.release(held.lease);
    }
  }

  /**
   * Rebalancing: the reader stops as at a clean stop (stores what is in flight, confirms it),
   * then the lease is released and the source stands by here while another member takes it.
   */
  handBack(): boolean {
    const run = this.current;
    // Still starting (no reader yet): the keeper asks again at its next renewal.
    if (this.stopping || run === null || this.handingBack) return false;
    this.handingBack = true;
    this.log.info('handing the source back to rebalance the fleet: stopping its reader');
    run.requestStop();
    return true;
  }

  private async runLeased(leaseLost: Promise<never>): Promise<void> {
    try {
      await this.runReader(leaseLost);
    } catch (error) {
      if (this.stopping || this.source.snapshot !== 'when_needed' || !isLostChanges(error))
        throw error;
      const recovered = await recoverLostSlot(this.store, this.source, this.log);
      if (recovered === null) throw error;
      this.metrics.snapshots.inc({ source: this.source.id, reason: 'when_needed' });
      this.metrics.gaps.inc({ source: this.source.id, reason: recovered.gap!.reason });
      this.log.error(
        {
          code: (error as { code?: string }).code,
          gapId: recovered.gap!.id,
          reason: recovered.gap!.reason,
          fromLsn: recovered.gap!.fromLsn,
          toLsn: recovered.gap!.toLsn,
          snapshot: recovered.snapshotId,
        },
        `changes were lost (${oneLine((error as Error).message)}); snapshot: when_needed recorded gap #${recovered.gap!.id} in cdc_gaps (${recovered.gap!.fromLsn} to ${recovered.gap!.toLsn}) and begins snapshot #${recovered.snapshotId} of every published table`,
      );
      await this.runReader(leaseLost);
    }
  }

  private async runReader(leaseLost: Promise<never>): Promise<void> {
    const checkpoint = await this.store.prepareSource(this.source.id);
    if (checkpoint) this.noteCheckpoint(checkpoint.lsn);
    // Before any snapshot asked for is handed over: the tables it names must be published.
    await this.keeper.keep(true);
    let snapshot = await this.store.pendingSnapshot(this.source.id);
    if (snapshot === null && checkpoint === null && this.source.snapshot !== 'never') {
      // A source new to the buffer: the rows its tables hold come first (the reader copies them
      // while it streams; see workers/snapshot/).
      snapshot = await this.store.createSnapshot(this.source.id, 'initial');
      this.metrics.snapshots.inc({ source: this.source.id, reason: 'initial' });
      this.log.info({ snapshot: snapshot.id }, 'a snapshot of the existing rows begins');
    }
    if (this.stopping) return;
    if (snapshot !== null || this.snapshot.report()?.state !== 'done') {
      this.snapshot.begin(snapshot);
      this.reportSnapshotTables();
    }
    this.log.info({ checkpoint: checkpoint?.lsn ?? null }, 'starting reader');
    const run = new ReaderRun({
      source: this.source,
      settings: readerSettings(this.config, this.source),
      checkpoint,
      buffer: this.store.identity,
      snapshot,
      writer: this.writer,
      pool: this.threads.pool(this.source),
      threadError: () => this.threads.takeError(this.source.id),
      log: this.log,
      listener: this,
    });
    this.current = run;
    const poll = setInterval(() => void this.pollSnapshot(run), SNAPSHOT_POLL_MS);
    try {
      await run.wait(leaseLost);
      this.log.info('reader stopped cleanly');
    } finally {
      clearInterval(poll);
      this.current = null;
      if (this.state === 'streaming') this.setState('starting');
    }
    if (!this.stopping && !this.handingBack)
      throw new Error('reader returned without being asked to stop');
  }

  /**
   * A snapshot asked for while the reader streams (`philotes-worker snapshot`, or the buffer's
   * philotes_request_snapshot()): handed to the reader once the one before it is finished.
   */
  private async pollSnapshot(run: ReaderRun): Promise<void> {
    if (this.state !== 'streaming' || this.current !== run || this.polling) return;
    this.polling = true;
    try {
      // In this one loop, first: a snapshot it asks for is only taken below, after its tables
      // have joined the publication (publication-keeper.ts).
      await this.keeper.keep();
      if (this.snapshot.report()?.state === 'running' || this.current !== run) return;
      const next = await this.store.pendingSnapshot(this.source.id);
      if (next === null || this.current !== run || next.id === this.snapshot.report()?.id) return;
      this.snapshot.begin(next);
      this.reportSnapshotTables();
      this.metrics.snapshots.inc({ source: this.source.id, reason: next.reason });
      this.log.info(
        {
          snapshot: next.id,
          reason: next.reason,
          tables: next.tables.map((t) => `${t.schema}.${t.table}`),
        },
        'a snapshot asked for begins',
      );
      run.startSnapshot(next);
    } catch (error) {
      this.log.warn({ err: error }, 'could not look for a snapshot asked for; trying again');
    } finally {
      this.polling = false;
    }
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
    // Before the buffer closes: a stopped process must not be read as running.
    await this.reporter.stop();
  }
}

function formatDelay(ms: number): string {
  return ms < 1000 ? `${ms}ms` : `${(ms / 1000).toFixed(1)}s`;
}
