/**
 * The buffer database, for the running side: one pool, migrated at open, and the buffer's SQL by
 * concern in the modules beside this one — writes.ts (events with their checkpoints, one
 * transaction per group), checkpoints.ts (resuming, recording confirmable positions),
 * snapshots.ts, gaps.ts (accepted gaps, retractions), leases.ts (members, leases, the fence), and reads.ts
 * (what the commands read on a connection of their own). This class holds the pool and hands it
 * to them; callers see one object.
 */
import pg from 'pg';
import type { ConnectionConfig } from '../common/config.js';
import { pgClientOptions } from '../common/pg-connection.js';
import type { Logger } from '../common/logger.js';
import type { PendingSnapshot } from '../common/protocol.js';
import { DATABASE_IDENTITY_SQL, type DatabaseIdentity } from '../common/database-identity.js';
import type { SourceIdentity } from '../common/source-history.js';
import {
  prepareSource,
  recordConfirmable,
  selectCheckpoint,
  type Checkpoint,
} from './checkpoints.js';
import { recordGap } from './gaps.js';
import { BufferHealth } from './health.js';
import {
  bufferApplicationName,
  PoolLeases,
  readLeases,
  type LeaseBook,
  type LeaseRow,
} from './leases.js';
import { migrate } from './migrations.js';
import { partitionSmallBuffer, type PartitionSettings } from './partitions.js';
import { EventWakeups } from './wakeups.js';
import { createSnapshot, endSnapshot, pendingSnapshot, requestSnapshot } from './snapshots.js';
import { recordSourceStatus, removeSourceStatus, type SourceStatusRow } from './source-status.js';
import { storeGroup, type StoredGroup, type StoreGroupPart } from './writes.js';

export type { Checkpoint } from './checkpoints.js';
export type { GapRecord } from './gaps.js';
export {
  asFencedError,
  bufferApplicationName,
  describeOwner,
  LEASES_CHANNEL,
  newMemberId,
  type MemberLoad,
  FencedError,
  LeaseBook,
  PoolLeases,
  type HeldLease,
  type LeaseRow,
  type Member,
} from './leases.js';
export type { BufferHealthReport, BufferState } from './health.js';
export { CommitOutcomeUnknownError, type StoredGroup, type StoreGroupPart } from './writes.js';

/** Longest a lease statement may take (an acquisition waits up to 1 s for a row lock). */
const LEASE_QUERY_TIMEOUT_MS = 5_000;

export class BufferStore {
  /** Which database this is, so a reader can tell when its source is this same database. */
  identity: DatabaseIdentity = { identity: '', schema: '' };

  /**
   * The leases this process holds, when it stores for sources: every store is fenced with them
   * (leases.ts). Null for a command that only reads.
   */
  book: LeaseBook | null = null;

  /** The lease statements, on the leases' own connections (leases.ts). */
  readonly leases: PoolLeases;

  private constructor(
    private readonly pool: pg.Pool,
    /**
     * The leases' own connections (renewal, acquisition): a renewal never queues behind the
     * writers' long transactions, which would let a lease lapse under load.
     */
    private readonly leasePool: pg.Pool,
    private readonly log: Logger,
    /** Open, or what the last connection to it met (health.ts). */
    readonly health: BufferHealth,
  ) {
    this.leases = new PoolLeases(leasePool);
  }

  /**
   * `memberId`: the process's id in the fleet (leases.ts), which names its sessions so that a
   * member taking over from a frozen one can find them.
   */
  static async open(
    conn: ConnectionConfig,
    log: Logger,
    poolSize: number,
    memberId?: string,
    /**
     * A capturing process: an unpartitioned cdc_events small enough is partitioned before
     * anything stores (partitions.ts), so that no reader, trigger or lock of an operator ever
     * meets the table in the middle of its conversion.
     */
    partitions?: PartitionSettings,
  ): Promise<BufferStore> {
    const options = pgClientOptions(
      conn,
      memberId === undefined ? 'philotes:buffer' : bufferApplicationName(memberId),
    );
    const health = new BufferHealth(conn);
    const pool = watchedPool(options, poolSize, health, log);
    // Opened on first use: only a running process holds leases. A statement that hangs (a
    // network cut without a reset) is given up, and its connection dropped by the pool, well
    // before a lease could lapse waiting for it.
    const leasePool = watchedPool(
      { ...options, query_timeout: LEASE_QUERY_TIMEOUT_MS },
      2,
      health,
      log,
    );
    const store = new BufferStore(pool, leasePool, log, health);
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (error) {
      await Promise.all([pool.end(), leasePool.end()]).catch(() => undefined);
      throw error; // described by the health watch
    }
    try {
      const applied = await migrate(client);
      // Not a reason to stop: the buffer keeper tries again every round.
      if (partitions !== undefined)
        await partitionSmallBuffer(client, partitions, log).catch((error: unknown) =>
          log.warn({ err: error }, 'partitioning the buffer at start failed; retrying later'),
        );
      const identity = await client.query<DatabaseIdentity>(DATABASE_IDENTITY_SQL);
      if (identity.rows[0]) store.identity = identity.rows[0];
      log.info(
        { applied },
        applied.length > 0 ? 'buffer schema migrated' : 'buffer schema up to date',
      );
    } catch (error) {
      client.release(true);
      await Promise.all([pool.end(), leasePool.end()]).catch(() => undefined);
      throw error;
    }
    client.release();
    return store;
  }

  /**
   * Before a reader (re)starts: removes anything stored beyond the checkpoint (the first part of
   * a large transaction cut off by a crash) and returns the checkpoint to resume from.
   */
  prepareSource(sourceId: string): Promise<Checkpoint | null> {
    return prepareSource(this.pool, this.log, sourceId, this.book);
  }

  /** The source's snapshot that has not finished, with each table's progress, if any. */
  pendingSnapshot(sourceId: string): Promise<PendingSnapshot | null> {
    return pendingSnapshot(this.pool, sourceId);
  }

  /** Ends a snapshot that cannot run (its state says why). */
  endSnapshot(sourceId: string, id: number, state: string): Promise<void> {
    return endSnapshot(this.pool, this.book, sourceId, id, state);
  }

  /** Asks for an on-demand snapshot (see philotes_request_snapshot in the migrations). */
  requestSnapshot(sourceId: string, tables: readonly string[] | null): Promise<number> {
    return requestSnapshot(this.pool, sourceId, tables);
  }

  createSnapshot(sourceId: string, reason: string): Promise<PendingSnapshot> {
    return createSnapshot(this.pool, this.book, sourceId, reason);
  }

  /** The stored checkpoint, read without changing anything. */
  readCheckpoint(sourceId: string): Promise<Checkpoint | null> {
    return selectCheckpoint(this.pool, sourceId, false);
  }

  /** Records accepted gaps and moves the source's checkpoint past them (gaps.ts). */
  recordGap(reset: Parameters<typeof recordGap>[1]): ReturnType<typeof recordGap> {
    return recordGap(this.pool, reset, this.book);
  }

  /** One source's lease as the buffer holds it, null if nobody ever took it. */
  async readLease(sourceId: string): Promise<LeaseRow | null> {
    return (await readLeases(this.pool, sourceId))[0] ?? null;
  }

  /** Wakes the consumers of sources whose checkpoint moved (wakeups.ts), created on first use. */
  get wakeups(): EventWakeups {
    this.wakeupsValue ??= new EventWakeups(this.pool, this.log);
    return this.wakeupsValue;
  }
  private wakeupsValue: EventWakeups | null = null;

  /** Several sources' batches in ONE transaction, each source's checkpoint with them (writes.ts). */
  storeGroup(parts: readonly StoreGroupPart[]): Promise<StoredGroup[]> {
    return storeGroup(this.pool, this.log, parts, this.book);
  }

  /** Records that Philotes may confirm the slot up to `lsn`, before it does (checkpoints.ts). */
  recordConfirmable(
    sourceId: string,
    slot: string,
    lsn: string,
    identity?: SourceIdentity,
    ddlGap?: { fromLsn: string; toLsn: string },
  ): Promise<void> {
    return recordConfirmable(this.pool, sourceId, slot, lsn, identity, ddlGap, this.book);
  }

  /** What this process says about a source, for status and check (source-status.ts). */
  recordSourceStatus(row: SourceStatusRow): Promise<void> {
    return recordSourceStatus(this.pool, row);
  }

  removeSourceStatus(sourceId: string, reporter: string): Promise<void> {
    return removeSourceStatus(this.pool, sourceId, reporter);
  }

  async close(): Promise<void> {
    await this.wakeupsValue?.stop();
    await Promise.all([this.pool.end(), this.leasePool.end()]);
  }
}

/** A pool whose connections report to the buffer's health, and whose lost ones never crash. */
function watchedPool(
  options: pg.ClientConfig,
  max: number,
  health: BufferHealth,
  log: Logger,
): pg.Pool {
  const pool = new pg.Pool({ ...options, max });
  health.watch(pool);
  // An idle client that loses its connection must not crash the process; the next query
  // on a fresh client reports the problem where it can be handled.
  pool.on('error', (error) => log.warn({ err: error }, 'idle buffer connection lost'));
  // pg-pool drops its own 'error' listener while a client is checked out; a connection lost
  // mid-COPY would then be an unhandled 'error' event and kill the process. The failing query
  // rejects as well, and that is where the failure is handled (rollback, reader restart).
  pool.on('connect', (client) =>
    client.on('error', (error) => {
      health.failed(error);
      log.warn({ err: error }, 'buffer connection lost');
    }),
  );
  return pool;
}
