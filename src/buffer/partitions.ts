/**
 * cdc_events partitioned by stored_at (the buffer's clock when the event was stored: monotone
 * enough that a partition, once its range has passed, receives nothing more), and retention that
 * drops whole partitions. Every statement here runs beside the capture without stalling it:
 *
 * - Partitions are made ahead of need as plain tables with their range as a CHECK, then ATTACHed:
 *   ATTACH takes SHARE UPDATE EXCLUSIVE on cdc_events, which the capture's inserts (ROW
 *   EXCLUSIVE) do not conflict with, and the CHECK spares it a scan. (CREATE TABLE ... PARTITION
 *   OF would lock cdc_events ACCESS EXCLUSIVE.) There is no default partition: DETACH
 *   CONCURRENTLY refuses to work beside one.
 * - A partition is dropped by DETACH ... CONCURRENTLY (14+; SHARE UPDATE EXCLUSIVE again), then
 *   DROP TABLE of a table nobody writes. No DELETE, no bloat.
 * - An unpartitioned buffer (schema before 11) is converted in place: a CHECK (stored_at < B),
 *   added NOT VALID (a moment's lock) and validated (a scan that lets writes go on), lets the
 *   old table be ATTACHed as the first partition without a scan, in a transaction of a few
 *   milliseconds that renames it and creates the partitioned cdc_events. Nothing is rewritten.
 *
 * Each partition keeps the key (source_id, lsn, seq) as its own primary key. A partitioned
 * table's primary key would have to include stored_at, so uniqueness across partitions rests on
 * what it always rested on: an event is stored with the checkpoint that moves past it, once.
 *
 * Every DDL statement waits at most LOCK_TIMEOUT for its lock: a capture transaction in flight
 * delays maintenance, never the other way round for longer than that.
 */
import type pg from 'pg';
import type { Logger } from '../common/logger.js';
import { READ_FUNCTION } from './migrations.js';

export const LOCK_TIMEOUT = '2s';
/** "partitions" on a phone keypad: the key of the lock one maintainer at a time holds. */
export const MAINTENANCE_LOCK_KEY = 72_784_846;
/**
 * A running Philotes converts an unpartitioned cdc_events up to this size by itself; a larger one
 * (its validating scan takes a while) waits for the operator's `philotes-worker partition-buffer`.
 */
export const AUTO_PARTITION_MAX_BYTES = 64 * 1024 * 1024;
const LEGACY_BOUND = 'cdc_events_legacy_bound';

export interface PartitionSettings {
  /** The range of one partition (1 day by default). */
  readonly partitionIntervalMs: number;
  /** Partitions made ahead of now. */
  readonly partitionsAhead: number;
}

/** Whether cdc_events is partitioned yet. */
export async function isPartitioned(client: pg.ClientBase): Promise<boolean> {
  const r = await client.query<{ kind: string }>(
    `SELECT relkind::text AS kind FROM pg_class WHERE oid = 'cdc_events'::regclass`,
  );
  return r.rows[0]?.kind === 'p';
}

/** Bytes of the unpartitioned cdc_events' heap. */
export async function eventsTableBytes(client: pg.ClientBase): Promise<number> {
  const r = await client.query<{ n: string }>(`SELECT pg_relation_size('cdc_events')::text AS n`);
  return Number(r.rows[0]!.n);
}

/** What a conversion took: the validating scan (writes go on) and the switch (a lock). */
export interface Conversion {
  readonly validateMs: number;
  readonly switchMs: number;
}

/** The buffer's clock, in ms since the epoch. */
async function bufferNow(client: pg.ClientBase): Promise<number> {
  const r = await client.query<{ ms: string }>(
    `SELECT (extract(epoch FROM now()) * 1000)::bigint::text AS ms`,
  );
  return Number(r.rows[0]!.ms);
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

/** cdc_events_p20261202t000000: the partition that begins at `fromMs` (UTC). */
export function partitionName(fromMs: number): string {
  const d = iso(fromMs);
  return `cdc_events_p${d.slice(0, 10).replaceAll('-', '')}t${d.slice(11, 19).replaceAll(':', '')}`;
}

async function withLockTimeout<T>(client: pg.ClientBase, work: () => Promise<T>): Promise<T> {
  await client.query(`BEGIN; SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`);
  try {
    const result = await work();
    await client.query('COMMIT');
    return result;
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
}

/**
 * Runs `work`, which reads partitions by name, after locking cdc_events itself (ACCESS SHARE,
 * which only an ACCESS EXCLUSIVE waits for): DDL on cdc_events (an operator's trigger or index,
 * our own ATTACH) locks the parent before its partitions, and a reader that took a partition
 * first could deadlock with it.
 */
async function parentFirst<T>(client: pg.ClientBase, work: () => Promise<T>): Promise<T> {
  return withLockTimeout(client, async () => {
    await client.query('LOCK TABLE ONLY cdc_events IN ACCESS SHARE MODE');
    return work();
  });
}

/**
 * Converts an unpartitioned cdc_events in place (see above); returns false if it was already
 * partitioned. The first partition's range ends at B, two intervals ahead, so that the switch
 * (seconds away) comes well before it: rows stored after B would break the CHECK. If the switch
 * cannot be made in time (a lock never granted), the CHECK is dropped again before B.
 */
export async function partitionEvents(
  client: pg.ClientBase,
  settings: PartitionSettings,
): Promise<Conversion | null> {
  if (await isPartitioned(client)) return null;
  const interval = settings.partitionIntervalMs;
  const now = await bufferNow(client);
  const bound = Math.floor(now / interval) * interval + 2 * interval;
  const existing = await client.query<{ def: string }>(
    `SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint
      WHERE conrelid = 'cdc_events'::regclass AND conname = $1`,
    [LEGACY_BOUND],
  );
  if (existing.rows.length > 0)
    await withLockTimeout(client, () =>
      client.query(`ALTER TABLE cdc_events DROP CONSTRAINT ${LEGACY_BOUND}`),
    );
  await withLockTimeout(client, () =>
    client.query(
      `ALTER TABLE cdc_events ADD CONSTRAINT ${LEGACY_BOUND}
         CHECK (stored_at < '${iso(bound)}'::timestamptz) NOT VALID`,
    ),
  );
  let validateMs: number;
  let switchMs: number;
  try {
    // A scan, under a lock that lets the capture write on.
    const began = performance.now();
    await client.query(`ALTER TABLE cdc_events VALIDATE CONSTRAINT ${LEGACY_BOUND}`);
    validateMs = performance.now() - began;
    const switching = performance.now();
    await withLockTimeout(client, async () => {
      await client.query(`
        ALTER TABLE cdc_events RENAME TO cdc_events_legacy;
        ALTER INDEX IF EXISTS cdc_events_pkey RENAME TO cdc_events_legacy_pkey;
        CREATE TABLE cdc_events (LIKE cdc_events_legacy INCLUDING DEFAULTS)
          PARTITION BY RANGE (stored_at);
        ALTER TABLE cdc_events ATTACH PARTITION cdc_events_legacy
          FOR VALUES FROM (MINVALUE) TO ('${iso(bound)}');
        ${READ_FUNCTION}
        INSERT INTO cdc_partitions (name, from_at, to_at) VALUES ('cdc_events_legacy', NULL, '${iso(bound)}');`);
    });
    switchMs = performance.now() - switching;
  } catch (error) {
    // Not switched: the CHECK must not outlive B on the table the capture writes.
    await withLockTimeout(client, () =>
      client.query(`ALTER TABLE cdc_events DROP CONSTRAINT IF EXISTS ${LEGACY_BOUND}`),
    ).catch(() => undefined);
    throw error;
  }
  return { validateMs, switchMs };
}

/** Makes the partitions from the last one's end up to `partitionsAhead` intervals past now. */
export async function ensurePartitions(
  client: pg.ClientBase,
  settings: PartitionSettings,
): Promise<string[]> {
  const interval = settings.partitionIntervalMs;
  const now = await bufferNow(client);
  const last = await client.query<{ to_ms: string | null }>(
    `SELECT (extract(epoch FROM max(to_at)) * 1000)::bigint::text AS to_ms FROM cdc_partitions`,
  );
  const until = Math.floor(now / interval) * interval + (settings.partitionsAhead + 1) * interval;
  let from =
    last.rows[0]?.to_ms != null
      ? Number(last.rows[0].to_ms)
      : Math.floor(now / interval) * interval;
  const made: string[] = [];
  while (from < until) {
    const to = from + interval;
    const name = partitionName(from);
    await withLockTimeout(client, () =>
      client.query(`
        CREATE TABLE ${name} (LIKE cdc_events INCLUDING DEFAULTS,
          PRIMARY KEY (source_id, lsn, seq),
          CONSTRAINT ${name}_range CHECK (stored_at >= '${iso(from)}' AND stored_at < '${iso(to)}'));
        ALTER TABLE cdc_events ATTACH PARTITION ${name} FOR VALUES FROM ('${iso(from)}') TO ('${iso(to)}');
        INSERT INTO cdc_partitions (name, from_at, to_at) VALUES ('${name}', '${iso(from)}', '${iso(to)}');`),
    );
    made.push(name);
    from = to;
  }
  return made;
}

/** A partition as cdc_partitions records it. */
export interface PartitionRow {
  readonly name: string;
  readonly fromAt: Date | null;
  readonly toAt: Date;
}

/** Partitions not dropped yet whose whole range is older than `ageMs`, oldest first. */
export async function partitionsOlderThan(
  client: pg.ClientBase,
  ageMs: number,
): Promise<PartitionRow[]> {
  const r = await client.query<{ name: string; from_at: Date | null; to_at: Date }>(
    `SELECT name, from_at, to_at FROM cdc_partitions
      WHERE dropped_at IS NULL AND to_at <= now() - $1::int8 * interval '1 millisecond'
      ORDER BY to_at`,
    [ageMs],
  );
  return r.rows.map((p) => ({ name: p.name, fromAt: p.from_at, toAt: p.to_at }));
}

/**
 * The oldest transaction still open that began before `toAt`, if any. Nothing more can enter a
 * partition that ends at `toAt` once there is none: rows go to the partition of
 * their stored_at, the now() of the transaction that stores them, which is that transaction's
 * start. Once no transaction that began before `toAt` is still open, the partition's rows are
 * final, and a check of who has read them stays true (positions only move forward). Sessions of
 * other roles show no xact_start without pg_read_all_stats; Philotes stores with this role.
 */
export async function openBefore(
  client: pg.ClientBase,
  toAt: Date,
): Promise<{ pid: number; xactStart: Date; applicationName: string } | null> {
  const r = await client.query<{ pid: number; xact_start: Date; application_name: string }>(
    `SELECT pid, xact_start, application_name FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start < $1
      ORDER BY xact_start LIMIT 1`,
    [toAt],
  );
  const row = r.rows[0];
  return row === undefined
    ? null
    : { pid: row.pid, xactStart: row.xact_start, applicationName: row.application_name };
}

/**
 * The groups (not expired) that have not read everything of the partition: for a source whose
 * events it holds, a group with a position there that is below the partition's last event. A
 * group with no position of a source does not follow that source and holds nothing of it.
 */
export async function groupsBehind(client: pg.ClientBase, partition: string): Promise<string[]> {
  // The last event of each source in the partition, by a skip scan of its primary key.
  const r = await parentFirst(client, () =>
    client.query<{ consumer: string }>(
      `WITH RECURSIVE s AS (
       SELECT min(source_id) AS id FROM ${partition}
       UNION ALL
       SELECT (SELECT min(source_id) FROM ${partition} WHERE source_id > s.id) FROM s WHERE s.id IS NOT NULL),
     last AS (
       SELECT s.id, e.lsn, e.seq FROM s
         CROSS JOIN LATERAL (SELECT lsn, seq FROM ${partition} WHERE source_id = s.id
                              ORDER BY lsn DESC, seq DESC LIMIT 1) e
        WHERE s.id IS NOT NULL)
     SELECT DISTINCT o.consumer FROM last
       JOIN cdc_consumer_offsets o ON o.source_id = last.id
       JOIN cdc_consumers c ON c.name = o.consumer AND c.expired_at IS NULL
      WHERE (o.lsn, o.seq) < (last.lsn, last.seq)
      ORDER BY 1`,
    ),
  );
  return r.rows.map((row) => row.consumer);
}

/** Marks groups expired: retention dropped events they had not read. */
export async function expireGroups(
  client: pg.ClientBase,
  groups: readonly string[],
  reason: string,
): Promise<void> {
  await client.query(
    `UPDATE cdc_consumers SET expired_at = now(), expired_reason = $2
      WHERE name = ANY($1) AND expired_at IS NULL`,
    [groups, reason],
  );
}

/**
 * Detaches (concurrently where the server can: 14+) and drops a partition; returns how many
 * events it held. A detach a crash interrupted is finished first.
 */
export async function dropPartition(client: pg.ClientBase, partition: string): Promise<number> {
  const version = Number(
    (await client.query<{ v: string }>(`SELECT current_setting('server_version_num') AS v`))
      .rows[0]!.v,
  );
  const attached = await client.query<{ pending: boolean }>(
    `SELECT ${version >= 140000 ? 'i.inhdetachpending' : 'false'} AS pending FROM pg_inherits i
      WHERE i.inhparent = 'cdc_events'::regclass AND i.inhrelid = to_regclass($1)`,
    [partition],
  );
  const events = Number(
    (
      await client.query<{ n: string }>(
        `SELECT CASE WHEN to_regclass($1) IS NULL THEN 0 ELSE (SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)) END::text AS n`,
        [partition],
      )
    ).rows[0]!.n,
  );
  if (attached.rows[0]?.pending === true)
    await client.query(`ALTER TABLE cdc_events DETACH PARTITION ${partition} FINALIZE`);
  else if (attached.rows.length > 0) {
    if (version >= 140000) {
      await client.query(`SET lock_timeout = '${LOCK_TIMEOUT}'`);
      try {
        await client.query(`ALTER TABLE cdc_events DETACH PARTITION ${partition} CONCURRENTLY`);
      } finally {
        await client.query('RESET lock_timeout');
      }
    } else
      await withLockTimeout(client, () =>
        client.query(`ALTER TABLE cdc_events DETACH PARTITION ${partition}`),
      );
  }
  await withLockTimeout(client, () =>
    client.query(`
      DROP TABLE IF EXISTS ${partition};
      UPDATE cdc_partitions SET dropped_at = now(), dropped_events = ${Math.max(0, events)}
       WHERE name = '${partition}';`),
  );
  return Math.max(0, events);
}

/** What the buffer holds: partitions, bytes, the oldest event's storing time. */
export interface BufferSize {
  readonly partitioned: boolean;
  readonly partitions: number;
  readonly bytes: number;
  readonly oldestStoredAt: Date | null;
}

export async function bufferSize(client: pg.ClientBase): Promise<BufferSize> {
  const partitioned = await isPartitioned(client);
  return partitioned ? parentFirst(client, () => sizeOf(client, true)) : sizeOf(client, false);
}

async function sizeOf(client: pg.ClientBase, partitioned: boolean): Promise<BufferSize> {
  const r = await client.query<{ partitions: number; bytes: string }>(
    partitioned
      ? `SELECT count(*)::int AS partitions,
                coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::text AS bytes
           FROM pg_inherits i WHERE i.inhparent = 'cdc_events'::regclass`
      : `SELECT 1 AS partitions, pg_total_relation_size('cdc_events')::text AS bytes`,
  );
  const row = r.rows[0]!;
  return {
    partitioned,
    partitions: row.partitions,
    bytes: Number(row.bytes),
    oldestStoredAt: await oldestStored(client, partitioned),
  };
}

/**
 * About when the oldest event was stored: the first rows of the oldest partition that has any
 * (stored_at has no index; rows go in about in order, and nothing but a restart deletes from a
 * partition), not a scan of the buffer.
 */
async function oldestStored(client: pg.ClientBase, partitioned: boolean): Promise<Date | null> {
  const tables = partitioned
    ? (
        await client.query<{ name: string }>(
          `SELECT p.name FROM cdc_partitions p
            WHERE p.dropped_at IS NULL AND to_regclass(p.name) IS NOT NULL ORDER BY p.to_at`,
        )
      ).rows.map((p) => p.name)
    : ['cdc_events'];
  for (const table of tables) {
    const first = await client.query<{ at: Date | null }>(
      `SELECT min(stored_at) AS at FROM (SELECT stored_at FROM ${table} LIMIT 1000) x`,
    );
    if (first.rows[0]?.at != null) return first.rows[0].at;
  }
  return null;
}

/**
 * At a capturing process's start: an unpartitioned cdc_events up to AUTO_PARTITION_MAX_BYTES (a
 * new buffer's is empty) is partitioned now, and the partitions ahead made, holding the
 * maintenance lock so that processes starting together do it once. A larger one is left to
 * `partition-buffer` (the buffer keeper says so).
 */
export async function partitionSmallBuffer(
  client: pg.ClientBase,
  settings: PartitionSettings,
  log: Logger,
): Promise<void> {
  await client.query('SELECT pg_advisory_lock($1)', [MAINTENANCE_LOCK_KEY]);
  try {
    if (!(await isPartitioned(client))) {
      if ((await eventsTableBytes(client)) > AUTO_PARTITION_MAX_BYTES) return;
      const done = await partitionEvents(client, settings);
      if (done !== null)
        log.info(
          { validateMs: Math.round(done.validateMs), switchMs: Math.round(done.switchMs) },
          'cdc_events is partitioned now: the old table is its first partition (nothing was rewritten)',
        );
    }
    await ensurePartitions(client, settings);
  } finally {
    await client.query('SELECT pg_advisory_unlock($1)', [MAINTENANCE_LOCK_KEY]);
  }
}
