/**
 * The buffer's upkeep, beside the capture (src/buffer/partitions.ts): cdc_events partitioned
 * (converted in place once), partitions made ahead, and retention: a partition whose whole range
 * is older than `retention` is dropped once every consumer group has read it; one older than
 * `retentionMax` is dropped anyway, and the groups still behind it are expired, loudly.
 *
 * One replica at a time does it (a session advisory lock on the keeper's own connection, tried,
 * never waited for); every replica reads the sizes and the consumers' lag for its metrics.
 */
import pg from 'pg';
import type { ConnectionConfig } from '../common/config.js';
import type { Logger } from '../common/logger.js';
import { pgClientOptions } from '../common/pg-connection.js';
import { readConsumerLag, type ConsumerLag } from '../buffer/consumer-stats.js';
import {
  AUTO_PARTITION_MAX_BYTES,
  MAINTENANCE_LOCK_KEY,
  bufferSize,
  eventsTableBytes,
  isPartitioned,
  dropPartition,
  ensurePartitions,
  expireGroups,
  groupsBehind,
  partitionEvents,
  openBefore,
  partitionsOlderThan,
  type BufferSize,
  type PartitionSettings,
} from '../buffer/partitions.js';

/** How often the sizes and the consumers' lag are read for the metrics and the status page. */
const STATS_INTERVAL_MS = 15_000;
/** A transaction open this long that holds retention back is said at warn level. */
const LONG_TRANSACTION_MS = 10 * 60_000;

export interface RetentionSettings extends PartitionSettings {
  readonly retentionMs: number;
  readonly retentionMaxMs: number;
}

/** What a round saw, for the metrics and the status page. */
export interface BufferKeeperObserver {
  size(size: BufferSize): void;
  consumers(lag: readonly ConsumerLag[]): void;
  dropped(partition: string, events: number): void;
  expired(groups: readonly string[]): void;
}

export class BufferKeeper {
  private timer: NodeJS.Timeout | undefined;
  private statsTimer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private client: pg.Client | null = null;
  private stopped = false;
  private failures = 0;
  /** The last round's view, for /readyz and the status page. */
  last: { size: BufferSize | null; consumers: readonly ConsumerLag[] } = {
    size: null,
    consumers: [],
  };

  constructor(
    private readonly buffer: ConnectionConfig,
    private readonly settings: RetentionSettings,
    private readonly log: Logger,
    private readonly observer: BufferKeeperObserver,
  ) {}

  /** Each round at most a quarter interval apart (and at least every 5 minutes, 1 s at most often). */
  get periodMs(): number {
    return Math.max(1000, Math.min(300_000, this.settings.partitionIntervalMs / 4));
  }

  start(): void {
    void this.round();
    this.timer = setInterval(() => void this.round(), this.periodMs);
    this.timer.unref();
    // The sizes and lags are read more often than maintenance runs: they are what people watch.
    this.statsTimer = setInterval(() => void this.round(false), STATS_INTERVAL_MS);
    this.statsTimer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    clearInterval(this.statsTimer);
    await this.running;
    await this.client?.end().catch(() => undefined);
    this.client = null;
  }

  /** One round now (or the one in flight); `maintain` false: the sizes and lags only. Never rejects. */
  round(maintain = true): Promise<void> {
    this.running ??= this.work(maintain)
      .then(() => {
        if (this.failures > 0) this.log.info('buffer maintenance works again');
        this.failures = 0;
      })
      .catch((error: unknown) => {
        if (this.failures++ === 0)
          this.log.error(
            { err: error },
            `buffer maintenance failed (partitions, retention); retrying every ${this.periodMs / 1000} s: the capture goes on while partitions made ahead last (partitionsAhead)`,
          );
        void this.client?.end().catch(() => undefined);
        this.client = null;
      })
      .finally(() => (this.running = null));
    return this.running;
  }

  private async connection(): Promise<pg.Client> {
    if (this.client !== null) return this.client;
    const client = new pg.Client(pgClientOptions(this.buffer, 'philotes:maintenance'));
    client.on('error', () => undefined); // the query in flight rejects
    await client.connect();
    this.client = client;
    return client;
  }

  private async work(maintain: boolean): Promise<void> {
    if (this.stopped) return;
    const client = await this.connection();
    const lock = maintain
      ? await client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1) AS ok', [
          MAINTENANCE_LOCK_KEY,
        ])
      : null;
    if (lock?.rows[0]?.ok === true) {
      try {
        if (await this.partitioned(client)) {
          const made = await ensurePartitions(client, this.settings);
          if (made.length > 0) this.log.info({ partitions: made }, 'buffer partitions made ahead');
          if (this.settings.retentionMs > 0) await this.retain(client);
        }
      } finally {
        await client.query('SELECT pg_advisory_unlock($1)', [MAINTENANCE_LOCK_KEY]);
      }
    }
    const size = await bufferSize(client);
    const consumers = await readConsumerLag(client);
    this.last = { size, consumers };
    this.observer.size(size);
    this.observer.consumers(consumers);
  }

  /**
   * Whether cdc_events is partitioned, converting a small one now. A large one is the
   * operator's to convert (`partition-buffer`, a scan of it): until then nothing is dropped, and
   * the keeper says so once an hour.
   */
  private async partitioned(client: pg.Client): Promise<boolean> {
    if (await isPartitioned(client)) return true;
    const bytes = await eventsTableBytes(client);
    if (bytes > AUTO_PARTITION_MAX_BYTES) {
      if (Date.now() - this.toldUnpartitionedAt > 3_600_000) {
        this.toldUnpartitionedAt = Date.now();
        this.log.warn(
          { bytes },
          `cdc_events is not partitioned yet (${Math.round(bytes / 1048576)} MB): retention cannot drop anything until it is. Run philotes-worker partition-buffer (online: the capture goes on; see docs/operations.md)`,
        );
      }
      return false;
    }
    const done = await partitionEvents(client, this.settings);
    if (done !== null)
      this.log.info(
        { validateMs: Math.round(done.validateMs), switchMs: Math.round(done.switchMs) },
        'cdc_events is partitioned now: the old table is its first partition (nothing was rewritten)',
      );
    return true;
  }
  private toldUnpartitionedAt = -Infinity;

  /** Drops the partitions retention allows, oldest first, stopping at the first still held. */
  private async retain(client: pg.Client): Promise<void> {
    for (const partition of await partitionsOlderThan(client, this.settings.retentionMs)) {
      if (this.stopped) return;
      // A capture transaction that began before the partition's end may still add rows to it
      // that no group has read: decide only once none is open (docs/design/consumers.md §7).
      const open = await openBefore(client, partition.toAt);
      if (open !== null) {
        // Capture transactions last moments; one open for long is somebody's, and holds retention.
        const long = Date.now() - open.xactStart.getTime() > LONG_TRANSACTION_MS;
        this.log[long ? 'warn' : 'debug'](
          { partition: partition.name, ...open },
          `partition ${partition.name} is past retention, but a transaction that began before its end is still open (pid ${open.pid}, since ${open.xactStart.toISOString()}): it may still store into it, so nothing is dropped until it ends`,
        );
        return;
      }
      const behind = await groupsBehind(client, partition.name);
      if (behind.length > 0) {
        const max = this.settings.retentionMaxMs;
        const age = Date.now() - partition.toAt.getTime();
        if (max === 0 || age < max) {
          this.log.debug(
            { partition: partition.name, groups: behind },
            'a partition past retention is kept: consumer groups have not read it',
          );
          return;
        }
        const reason = `partition ${partition.name} (events stored before ${partition.toAt.toISOString()}) was dropped by retentionMax before this group had read it`;
        await expireGroups(client, behind, reason);
        this.observer.expired(behind);
        this.log.error(
          { partition: partition.name, groups: behind },
          `consumer group(s) ${behind.join(', ')} expired: ${reason}. They read nothing more until deleted and made again (see "Consuming the buffer" in the README)`,
        );
      }
      const events = await dropPartition(client, partition.name);
      this.observer.dropped(partition.name, events);
      this.log.info({ partition: partition.name, events }, 'buffer partition dropped by retention');
    }
  }
}
