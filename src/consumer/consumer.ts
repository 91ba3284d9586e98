/**
 * A member of a consumer group: reads the buffer's sources for its group, exactly once, and hands
 * each batch to a handler inside the transaction that moves the group's position past it.
 *
 * - The group's sources are shared by its members through leases (consumerLeaseKey, the same
 *   fenced leases the capturing replicas use, src/supervisor/lease-keeper.ts): each batch's
 *   transaction begins with the fence, so a member whose lease has passed to another cannot
 *   commit, and its handler's effects roll back with it. Two members never take one batch.
 * - A batch is whole transactions of the source only (batches.ts), after the group's position,
 *   with the gaps in their place and a retraction to undo first.
 * - A member waits on LISTEN philotes_events when it has read everything (wakeups.ts), and polls
 *   every pollIntervalMs anyway (a wake-up missed while reconnecting is not kept).
 * - A handler that throws: the transaction rolls back, and the batch is tried again after a
 *   backoff (1 s doubling to 30 s), logged each time. The source waits; nothing is skipped.
 */
import { hostname } from 'node:os';
import pg from 'pg';
import type { ConnectionConfig } from '../common/config.js';
import type { Logger } from '../common/logger.js';
import { pgClientOptions } from '../common/pg-connection.js';
import {
  asFencedError,
  bufferApplicationName,
  consumerLeaseKey,
  fenceStatement,
  newMemberId,
  PoolLeases,
  type HeldLease,
} from '../buffer/leases.js';
import { EVENTS_CHANNEL } from '../buffer/wakeups.js';
import { LeaseKeeper, type RunLease } from '../supervisor/lease-keeper.js';
import { ensurePosition, nextBatch, type StartAt } from './batches.js';
import type { ConsumedRecord } from './records.js';

/** The buffer schema version consuming needs (migration 10: groups, gaps, retractions). */
export const CONSUMER_SCHEMA_VERSION = 10;

/** A group's name: what a source id may hold (no ':', which the lease keys use). */
const GROUP_NAME = /^[A-Za-z0-9_.-]{1,128}$/;

/** One source's records for the handler, in the order they must be handled (records.ts). */
export interface ConsumedBatch {
  readonly source: string;
  readonly records: readonly ConsumedRecord[];
}

/**
 * Handles a batch. `tx` is the buffer transaction that commits the group's position past the
 * batch when the handler returns: write the effects through it and they happen exactly once. A
 * throw rolls it back, and the batch comes again.
 */
export type BatchHandler = (batch: ConsumedBatch, tx: pg.ClientBase) => Promise<void>;

export interface ConsumeSettings {
  readonly group: string;
  /** The sources to read; empty or undefined: every source the buffer has, new ones as they come. */
  readonly sources?: readonly string[] | undefined;
  /** Where the group begins a source it has no position of yet (default: earliest). */
  readonly from?: StartAt | undefined;
  /** Events per batch (default 1000). */
  readonly batchSize?: number | undefined;
  /** How often a member that has read everything looks again without a wake-up (default 1 s). */
  readonly pollIntervalMs?: number | undefined;
  /** LISTEN for wake-ups (default true; false through a transaction-pooling PgBouncer). */
  readonly listen?: boolean | undefined;
  /** Connections for the batches (default 4); the leases and the LISTEN have their own. */
  readonly connections?: number | undefined;
  readonly leaseTtlMs?: number | undefined;
  readonly leaseRenewIntervalMs?: number | undefined;
  readonly rebalanceMinHoldMs?: number | undefined;
}

const DEFAULTS = {
  batchSize: 1000,
  pollIntervalMs: 1000,
  connections: 4,
  leaseTtlMs: 6000,
  leaseRenewIntervalMs: 2000,
  rebalanceMinHoldMs: 10_000,
};
/** How often the buffer's list of sources is read again when the group reads them all. */
const SOURCES_REFRESH_MS = 10_000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30_000;

/** A setting a consumer cannot run with: say which and why, before anything starts. */
export class ConsumeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConsumeError';
  }
}

export function checkSettings(settings: ConsumeSettings): void {
  if (!GROUP_NAME.test(settings.group))
    throw new ConsumeError(
      `the group must be 1-128 characters of letters, digits, '_', '.' or '-', got ${JSON.stringify(settings.group)}`,
    );
  for (const source of settings.sources ?? [])
    if (!GROUP_NAME.test(source))
      throw new ConsumeError(`${JSON.stringify(source)} is not a source id`);
  const size = settings.batchSize ?? DEFAULTS.batchSize;
  if (!Number.isInteger(size) || size < 1 || size > 100_000)
    throw new ConsumeError(`the batch size must be an integer from 1 to 100000, got ${size}`);
}

interface SourceLoop {
  readonly done: Promise<void>;
  /**
   * Wakes the loop from its wait (new events, a stop, a lost lease, a hand-back); woken while
   * it was busy, its next wait returns at once, so a wake-up during a batch is not lost.
   */
  wake: () => void;
  woken: boolean;
  /** Asked to hand its lease back (rebalancing): after the batch in hand. */
  handingBack: boolean;
  holding: boolean;
}

export class GroupMember {
  readonly memberId = newMemberId(hostname(), process.pid);
  private readonly settings: Required<Omit<ConsumeSettings, 'sources' | 'from'>> & {
    from: StartAt;
  };
  private readonly pool: pg.Pool;
  private readonly leasePool: pg.Pool;
  private readonly keeper: LeaseKeeper;
  private readonly loops = new Map<string, SourceLoop>();
  private readonly abort = new AbortController();
  private listener: pg.Client | null = null;
  private listening: Promise<void> | null = null;
  private refreshTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  /** Started: sources found from now on get a loop at once. */
  private running = false;
  private keeperStarted = false;
  private failure: Error | null = null;
  private resolveDone: () => void = () => undefined;
  private rejectDone: (error: Error) => void = () => undefined;
  /** Settles when the member has stopped: rejects if it could not start. */
  readonly done = new Promise<void>((resolve, reject) => {
    this.resolveDone = resolve;
    this.rejectDone = reject;
  });

  constructor(
    private readonly buffer: ConnectionConfig,
    settings: ConsumeSettings,
    private readonly handler: BatchHandler,
    private readonly log: Logger,
    version: string,
  ) {
    checkSettings(settings);
    this.settings = {
      group: settings.group,
      from: settings.from ?? 'earliest',
      batchSize: settings.batchSize ?? DEFAULTS.batchSize,
      pollIntervalMs: settings.pollIntervalMs ?? DEFAULTS.pollIntervalMs,
      listen: settings.listen ?? true,
      connections: settings.connections ?? DEFAULTS.connections,
      leaseTtlMs: settings.leaseTtlMs ?? DEFAULTS.leaseTtlMs,
      leaseRenewIntervalMs: settings.leaseRenewIntervalMs ?? DEFAULTS.leaseRenewIntervalMs,
      rebalanceMinHoldMs: settings.rebalanceMinHoldMs ?? DEFAULTS.rebalanceMinHoldMs,
    };
    this.named = settings.sources !== undefined && settings.sources.length > 0;
    for (const source of settings.sources ?? []) this.wanted.add(source);
    this.done.catch(() => undefined);
    this.pool = this.newPool(this.settings.connections);
    this.leasePool = this.newPool(2);
    this.keeper = new LeaseKeeper(
      new PoolLeases(this.leasePool),
      { ...this.settings, maxSources: 0 },
      log,
      () => this.wanted.size,
      this.memberId,
      version,
      'consumer',
      buffer,
      undefined,
      this.settings.group,
    );
    this.keeper.handBack = (key) => {
      const loop = this.loops.get(this.sourceOfKey(key));
      if (loop === undefined || !loop.holding) return false;
      loop.handingBack = true;
      loop.wake();
      return true;
    };
  }

  /** Sources named by the settings: the set never changes. Else the buffer's, read again. */
  private readonly named: boolean;
  private readonly wanted = new Set<string>();

  /** The sources this member reads now (holds the group's lease of). */
  owned(): string[] {
    return [...this.loops.entries()].filter(([, l]) => l.holding).map(([s]) => s);
  }

  /** Checks the buffer, registers the group and the member, and starts reading. */
  async start(): Promise<void> {
    try {
      await this.prepare();
      this.keeperStarted = true;
      await this.keeper.start();
      if (!this.named) await this.refreshSources();
      if (this.settings.listen) this.listening = this.listen();
      this.running = true;
      for (const source of this.wanted) this.startLoop(source);
      if (!this.named) {
        this.refreshTimer = setInterval(
          () =>
            void this.refreshSources().catch((error: unknown) =>
              this.log.warn({ err: error }, "reading the buffer's sources failed; retrying"),
            ),
          SOURCES_REFRESH_MS,
        );
        this.refreshTimer.unref();
      }
      this.log.info(
        { group: this.settings.group, member: this.memberId, sources: [...this.wanted] },
        'consumer started',
      );
    } catch (error) {
      this.failure = error as Error;
      await this.stop();
      throw error;
    }
  }

  /**
   * Stops after the batches in hand: each lease is released (another member takes the source
   * at once), then the member leaves the group.
   */
  async stop(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      clearInterval(this.refreshTimer);
      this.abort.abort();
      if (this.keeperStarted) await this.keeper.leave().catch(() => undefined);
      for (const loop of this.loops.values()) loop.wake();
      await Promise.all([...this.loops.values()].map((l) => l.done));
      if (this.keeperStarted) await this.keeper.stop();
      const listener = this.listener;
      this.listener = null;
      await listener?.end().catch(() => undefined);
      await this.listening;
      await Promise.all([this.pool.end(), this.leasePool.end()]).catch(() => undefined);
      if (this.failure !== null) this.rejectDone(this.failure);
      else this.resolveDone();
    }
    await this.done.catch(() => undefined);
  }

  private newPool(max: number): pg.Pool {
    const applicationName = bufferApplicationName(this.memberId);
    const pool = new pg.Pool({ ...pgClientOptions(this.buffer, applicationName), max });
    pool.on('error', (error) => this.log.warn({ err: error }, 'idle buffer connection lost'));
    // A checked-out client has no pool listener: a connection lost mid-batch (a buffer restart,
    // a takeover terminating a frozen member's sessions) would be an unhandled 'error' event and
    // kill the process. The query in flight rejects too, and the batch is tried again.
    pool.on('connect', (client) =>
      client.on('error', (error) => this.log.warn({ err: error }, 'buffer connection lost')),
    );
    return pool;
  }

  /** The buffer must be Philotes' at schema 10 or later; the group is created if new. */
  private async prepare(): Promise<void> {
    const exists = await this.pool.query<{ ok: boolean }>(
      `SELECT to_regclass('philotes_migrations') IS NOT NULL AS ok`,
    );
    const have =
      exists.rows[0]?.ok === true
        ? ((
            await this.pool.query<{ version: number | null }>(
              'SELECT max(version) AS version FROM philotes_migrations',
            )
          ).rows[0]?.version ?? null)
        : null;
    if (have === null)
      throw new ConsumeError(
        'this database is not a Philotes buffer (no philotes_migrations table): point the consumer at the buffer Philotes stores into',
      );
    if (have < CONSUMER_SCHEMA_VERSION)
      throw new ConsumeError(
        `the buffer's schema is version ${have}; consuming needs ${CONSUMER_SCHEMA_VERSION}: start this version of Philotes on it once (it migrates the buffer)`,
      );
    await this.pool.query('SELECT philotes_create_consumer($1)', [this.settings.group]);
    if (this.named) {
      // A misspelt source would be waited for without a word: say which the buffer has.
      const known = (
        await this.pool.query<{ source_id: string }>(
          'SELECT source_id FROM cdc_checkpoints ORDER BY 1',
        )
      ).rows.map((r) => r.source_id);
      const unknown = [...this.wanted].filter((s) => !known.includes(s));
      if (unknown.length > 0)
        this.log.warn(
          { unknown, known },
          `source${unknown.length > 1 ? 's' : ''} ${unknown.map((s) => `"${s}"`).join(', ')} not in the buffer (yet): read once Philotes stores ${unknown.length > 1 ? 'them' : 'it'}. The buffer has: ${known.length > 0 ? known.join(', ') : 'no source yet'}`,
        );
    }
  }

  private async refreshSources(): Promise<void> {
    const rows = await this.pool.query<{ source_id: string }>(
      'SELECT source_id FROM cdc_checkpoints ORDER BY source_id',
    );
    for (const { source_id: source } of rows.rows) {
      if (this.wanted.has(source)) continue;
      this.wanted.add(source);
      if (this.running) this.startLoop(source);
    }
  }

  private sourceOfKey(key: string): string {
    return key.slice(`consumer:${this.settings.group}:`.length);
  }

  private startLoop(source: string): void {
    if (this.loops.has(source) || this.stopping) return;
    const loop: SourceLoop = {
      done: Promise.resolve(),
      wake: () => (loop.woken = true),
      woken: false,
      handingBack: false,
      holding: false,
    };
    this.loops.set(source, loop);
    (loop as { done: Promise<void> }).done = this.runSource(source, loop).catch((error: unknown) =>
      this.log.error({ err: error, source }, 'consumer loop failed'),
    );
  }

  /** Stand by for the group's lease of the source, read while holding it, again and again. */
  private async runSource(source: string, loop: SourceLoop): Promise<void> {
    const key = consumerLeaseKey(this.settings.group, source);
    while (!this.stopping) {
      let run: RunLease | null;
      try {
        run = await this.keeper.acquire(key);
      } catch (error) {
        this.log.warn({ err: error, source }, 'asking for the lease failed; retrying');
        await this.pause(loop, this.settings.pollIntervalMs);
        continue;
      }
      if (run === null) {
        await this.keeper.waitForChance(key, this.abort.signal);
        continue;
      }
      loop.holding = true;
      loop.handingBack = false;
      try {
        await this.readWhileHeld(source, loop, run);
      } finally {
        loop.holding = false;
        await this.keeper.release(run.lease);
      }
    }
  }

  private async readWhileHeld(source: string, loop: SourceLoop, run: RunLease): Promise<void> {
    let lost = false;
    run.lost.catch(() => {
      lost = true;
      loop.wake();
    });
    const holds = () => !lost && !this.stopping && !loop.handingBack;
    let failures = 0;
    let started = false;
    while (holds()) {
      let outcome: 'read' | 'empty';
      try {
        if (!started) {
          await this.inFencedTransaction(run.lease, (c) =>
            ensurePosition(c, this.settings.group, source, this.settings.from),
          );
          started = true;
        }
        outcome = await this.oneBatch(source, run.lease);
        failures = 0;
      } catch (error) {
        if (asFencedError(error) !== null) {
          this.log.warn({ source }, 'another member of the group reads this source now');
          return;
        }
        const code = (error as { code?: unknown }).code;
        if (code === 'PH005') {
          // Nothing it reads now could be exact: the member stops, and says why.
          this.log.error({ err: error, source }, (error as Error).message);
          this.failure ??= error as Error;
          void this.stop();
          return;
        }
        if (code === 'PH004') {
          this.log.warn(
            { source, err: error },
            'events of this batch were retracted meanwhile (the source was reset to another history): reading again',
          );
          continue;
        }
        failures += 1;
        const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (failures - 1));
        this.log.error(
          { err: error, source, attempt: failures, retryInMs: delay },
          'a batch failed; nothing was committed, the same batch is tried again',
        );
        await this.pause(loop, delay);
        continue;
      }
      if (outcome === 'empty') await this.pause(loop, this.settings.pollIntervalMs);
    }
  }

  /** One batch in one fenced transaction: read, handle, commit the position. */
  private async oneBatch(source: string, lease: HeldLease): Promise<'read' | 'empty'> {
    return this.inFencedTransaction(lease, async (client) => {
      const batch = await nextBatch(client, this.settings.group, source, this.settings.batchSize);
      if (batch === null) return 'empty';
      if (batch.records.length > 0) await this.handler({ source, records: batch.records }, client);
      await batch.commit(client);
      return 'read';
    });
  }

  private async inFencedTransaction<T>(
    lease: HeldLease,
    work: (client: pg.PoolClient) => Promise<T>,
  ): Promise<T> {
    const client = await this.pool.connect();
    let broken: Error | undefined;
    try {
      await client.query(`BEGIN; ${fenceStatement(client, this.memberId, [lease])}`);
      const result = await work(client);
      await client.query('COMMIT');
      return result;
    } catch (error) {
      await client.query('ROLLBACK').catch((e: unknown) => (broken = e as Error));
      throw error;
    } finally {
      client.release(broken);
    }
  }

  /** Waits `ms`, or until the loop is woken. */
  private async pause(loop: SourceLoop, ms: number): Promise<void> {
    if (this.stopping || loop.woken) {
      loop.woken = false;
      return;
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      loop.wake = done;
    });
    loop.woken = false;
    loop.wake = () => (loop.woken = true);
  }

  /** LISTEN for stored events on a connection of its own, reconnecting while the member runs. */
  private async listen(): Promise<void> {
    while (!this.stopping) {
      const client = new pg.Client(
        pgClientOptions(this.buffer, bufferApplicationName(this.memberId)),
      );
      const ended = new Promise<void>((resolve) => {
        client.on('error', () => resolve());
        client.on('end', () => resolve());
      });
      client.on('notification', (message) => {
        if (message.payload !== undefined) this.loops.get(message.payload)?.wake();
      });
      try {
        await client.connect();
        await client.query(`LISTEN ${EVENTS_CHANNEL}`);
        if (this.stopping) break;
        this.listener = client;
        // Stored while nobody listened: look now.
        for (const loop of this.loops.values()) loop.wake();
        await ended;
      } catch {
        // The buffer is away: the loops poll meanwhile.
      } finally {
        if (this.listener === client) this.listener = null;
        await client.end().catch(() => undefined);
      }
      if (!this.stopping)
        await new Promise((resolve) => setTimeout(resolve, this.settings.pollIntervalMs));
    }
  }
}
