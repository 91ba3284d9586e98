/**
 * The buffer database, for the running side: one pool, migrated at open, and the buffer's SQL by
 * concern in the modules beside this one — writes.ts (events with their checkpoints, one
 * transaction per group), checkpoints.ts (resuming, recording confirmable positions),
 * snapshots.ts, gaps.ts (accepted gaps, retractions), lock.ts (a source's lock), and reads.ts
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
import { lockSource, type SourceLock } from './lock.js';
import { migrate } from './migrations.js';
import { createSnapshot, endSnapshot, pendingSnapshot, requestSnapshot } from './snapshots.js';
import { recordSourceStatus, removeSourceStatus, type SourceStatusRow } from './source-status.js';
import { storeGroup, type StoredGroup, type StoreGroupPart } from './writes.js';

export type { Checkpoint } from './checkpoints.js';
export type { GapRecord } from './gaps.js';
export type { SourceLock } from './lock.js';
export type { BufferHealthReport, BufferState } from './health.js';
export { CommitOutcomeUnknownError, type StoredGroup, type StoreGroupPart } from './writes.js';

export class BufferStore {
  /** Which database this is, so a reader can tell when its source is this same database. */
  identity: DatabaseIdentity = { identity: '', schema: '' };

  private constructor(
    private readonly pool: pg.Pool,
    private readonly clientOptions: pg.ClientConfig,
    private readonly log: Logger,
    /** Open, or what the last connection to it met (health.ts). */
    readonly health: BufferHealth,
  ) {}

  static async open(conn: ConnectionConfig, log: Logger, poolSize: number): Promise<BufferStore> {
    const options = pgClientOptions(conn, 'philotes:buffer');
    const pool = new pg.Pool({ ...options, max: poolSize });
    const health = new BufferHealth(conn);
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
    const store = new BufferStore(
      pool,
      { ...options, application_name: 'philotes:lock' },
      log,
      health,
    );
    let client: pg.PoolClient;
    try {
      client = await pool.connect();
    } catch (error) {
      await pool.end().catch(() => undefined);
      throw error; // described by the health watch
    }
    try {
      const applied = await migrate(client);
      const identity = await client.query<DatabaseIdentity>(DATABASE_IDENTITY_SQL);
      if (identity.rows[0]) store.identity = identity.rows[0];
      log.info(
        { applied },
        applied.length > 0 ? 'buffer schema migrated' : 'buffer schema up to date',
      );
    } catch (error) {
      client.release(true);
      await pool.end().catch(() => undefined);
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
    return prepareSource(this.pool, this.log, sourceId);
  }

  /** The source's snapshot that has not finished, with each table's progress, if any. */
  pendingSnapshot(sourceId: string): Promise<PendingSnapshot | null> {
    return pendingSnapshot(this.pool, sourceId);
  }

  /** Ends a snapshot that cannot run (its state says why). */
  endSnapshot(id: number, state: string): Promise<void> {
    return endSnapshot(this.pool, id, state);
  }

  /** Asks for an on-demand snapshot (see philotes_request_snapshot in the migrations). */
  requestSnapshot(sourceId: string, tables: readonly string[] | null): Promise<number> {
    return requestSnapshot(this.pool, sourceId, tables);
  }

  createSnapshot(sourceId: string, reason: string): Promise<PendingSnapshot> {
    return createSnapshot(this.pool, sourceId, reason);
  }

  /** The stored checkpoint, read without changing anything. */
  readCheckpoint(sourceId: string): Promise<Checkpoint | null> {
    return selectCheckpoint(this.pool, sourceId, false);
  }

  /** Records accepted gaps and moves the source's checkpoint past them (gaps.ts). */
  recordGap(reset: Parameters<typeof recordGap>[1]): ReturnType<typeof recordGap> {
    return recordGap(this.pool, reset);
  }

  /** The source's lock, on a connection of its own; null if another process holds it. */
  lockSource(sourceId: string): Promise<SourceLock | null> {
    return lockSource(this.clientOptions, sourceId);
  }

  /** Several sources' batches in ONE transaction, each source's checkpoint with them (writes.ts). */
  storeGroup(parts: readonly StoreGroupPart[]): Promise<StoredGroup[]> {
    return storeGroup(this.pool, this.log, parts);
  }

  /** Records that Philotes may confirm the slot up to `lsn`, before it does (checkpoints.ts). */
  recordConfirmable(
    sourceId: string,
    slot: string,
    lsn: string,
    identity?: SourceIdentity,
    ddlGap?: { fromLsn: string; toLsn: string },
  ): Promise<void> {
    return recordConfirmable(this.pool, sourceId, slot, lsn, identity, ddlGap);
  }

  /** What this process says about a source, for status and check (source-status.ts). */
  recordSourceStatus(row: SourceStatusRow): Promise<void> {
    return recordSourceStatus(this.pool, row);
  }

  removeSourceStatus(sourceId: string, reporter: string): Promise<void> {
    return removeSourceStatus(this.pool, sourceId, reporter);
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}
