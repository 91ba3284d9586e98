/**
 * Members and leases (migration 8): which Philotes process captures which source, decided by rows
 * under the buffer's clock, and the fence that makes a stale owner's store fail inside its own
 * transaction. The argument is in docs/design/leases.md.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';

/** A lease this process holds: the epoch its every store is fenced with. */
export interface HeldLease {
  readonly sourceId: string;
  readonly epoch: string;
}

/** A new member id: `host:pid:token`, the token also naming its buffer sessions. */
export function newMemberId(host: string, pid: number): string {
  return `${host}:${pid}:${randomBytes(4).toString('hex')}`;
}

/**
 * The lease of one source for one consumer group, in cdc_leases beside the sources' own: a source
 * id never holds a ':' (config-fields.ts), so the keys cannot meet.
 */
export function consumerLeaseKey(group: string, sourceId: string): string {
  return `consumer:${group}:${sourceId}`;
}

/** This process as a member of the buffer's fleet. */
export interface Member {
  readonly id: string;
  /**
   * 'capture' for a running process; 'command' for one that holds a lease for a moment;
   * 'consumer' for a member of a consumer group (its leases are consumerLeaseKey's).
   */
  readonly role: 'capture' | 'command' | 'consumer';
  /** A consumer's group: its fair share counts the group's members only. */
  readonly group?: string | undefined;
  readonly host: string;
  readonly pid: number;
  readonly version: string;
}

/** The SQLSTATE philotes_fence raises (a class of our own: no PostgreSQL error uses PH). */
export const FENCED_SQLSTATE = 'PH001';

/** A store was refused because another process took the source over (or it was released). */
export class FencedError extends Error {
  readonly code = FENCED_SQLSTATE;
  constructor(readonly sources: readonly string[]) {
    super(
      `fenced: this Philotes process no longer holds the lease of source(s) ${sources.join(', ')}; another process captures them now`,
    );
    this.name = 'FencedError';
  }
}

/** The fenced error a failed buffer query carries, if it is one. */
export function asFencedError(error: unknown): FencedError | null {
  if (error instanceof FencedError) return error;
  const e = error as { code?: unknown; detail?: unknown } | null;
  if (e?.code !== FENCED_SQLSTATE) return null;
  return new FencedError(typeof e.detail === 'string' ? e.detail.split(',') : []);
}

/**
 * The fence statement for a transaction storing for these leases, values written out (escaped)
 * so it travels in one simple query with the BEGIN.
 */
export function fenceStatement(
  client: pg.ClientBase,
  owner: string,
  leases: readonly HeldLease[],
): string {
  const sources = leases.map((l) => client.escapeLiteral(l.sourceId)).join(', ');
  const epochs = leases.map((l) => String(BigInt(l.epoch))).join(', ');
  return `SELECT philotes_fence(${client.escapeLiteral(owner)}, ARRAY[${sources}]::text[], ARRAY[${epochs}]::bigint[])`;
}

/**
 * The leases this process holds, as its stores see them: what each store is fenced with. A store
 * for a source whose lease is not held is refused before it begins. A view of whoever keeps the
 * leases (the lease keeper), not a copy of them.
 */
export class LeaseBook {
  constructor(
    readonly owner: string,
    private readonly held: (sourceId: string) => HeldLease | undefined,
  ) {}

  /** The fence for a transaction storing for these sources; FencedError if one is not held. */
  fence(client: pg.ClientBase, sourceIds: readonly string[]): string {
    const leases = [...new Set(sourceIds)].map((id) => this.held(id) ?? id);
    const missing = leases.filter((l): l is string => typeof l === 'string');
    if (missing.length > 0) throw new FencedError(missing);
    return fenceStatement(client, this.owner, leases as HeldLease[]);
  }
}

/**
 * Runs `work` in a transaction fenced for `sourceId` (with no book: a plain transaction, for a
 * command that does not capture). A refused fence comes out as FencedError.
 */
export async function inFencedTransaction<T>(
  pool: pg.Pool,
  book: LeaseBook | null,
  sourceId: string,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  const client = await pool.connect();
  try {
    const fence = book?.fence(client, [sourceId]);
    await client.query(fence ? `BEGIN; ${fence}` : 'BEGIN');
    const result = await work(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw asFencedError(error) ?? error;
  } finally {
    client.release();
  }
}

const ms = (name: string) => `${name}::int8 * interval '1 millisecond'`;

/** A live capturing member as the last renewal saw it: what the fair share is computed from. */
export interface MemberLoad {
  readonly id: string;
  /** Leases it holds that have not expired. */
  readonly held: number;
  /** Its maxSources; 0: no bound but the fair share. */
  readonly capacity: number;
}

/**
 * Registers the member (or refreshes it) and renews every lease it holds, in one statement.
 * Returns the leases it still holds and every live capturing member's load, itself included.
 */
export async function renewLeases(
  pool: pg.Pool,
  member: Member,
  ttlMs: number,
  capacity: number,
  leaving = false,
): Promise<{ held: HeldLease[]; members: MemberLoad[] }> {
  // The statement's reads see the tables as they were before its own writes: the member's own
  // row and leases come from the CTEs, the others' from the tables.
  const result = await pool.query<{ held: HeldLease[]; others: MemberLoad[] }>(
    `WITH m AS (
       INSERT INTO cdc_members (id, role, host, pid, version, capacity, leaving, expires_at,
                                consumer_group)
       VALUES ($1, $6, $2, $3, $4, $7, $8, now() + ${ms('$5')}, $9)
       ON CONFLICT (id) DO UPDATE
          SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at, capacity = EXCLUDED.capacity,
              leaving = EXCLUDED.leaving
       RETURNING id),
     l AS (
       UPDATE cdc_leases SET expires_at = now() + ${ms('$5')}
        WHERE owner = $1 AND EXISTS (SELECT 1 FROM m)
       RETURNING source_id, epoch::text)
     SELECT (SELECT coalesce(json_agg(json_build_object('sourceId', source_id, 'epoch', epoch)), '[]')
               FROM l) AS held,
            (SELECT coalesce(json_agg(json_build_object('id', o.id, 'capacity', o.capacity,
                      'held', (SELECT count(*) FROM cdc_leases x
                                WHERE x.owner = o.id AND x.expires_at > now()))), '[]')
               FROM cdc_members o
              WHERE o.expires_at > now() AND o.id <> $1 AND o.role = $6
                AND o.consumer_group IS NOT DISTINCT FROM $9 AND NOT o.leaving) AS others`,
    [
      member.id,
      member.host,
      member.pid,
      member.version,
      ttlMs,
      member.role,
      capacity,
      leaving,
      member.group ?? null,
    ],
  );
  const row = result.rows[0]!;
  return {
    held: row.held,
    members: leaving
      ? row.others
      : [{ id: member.id, held: row.held.length, capacity }, ...row.others],
  };
}

/** What asking for a source's lease came to. */
export type AcquireResult =
  | {
      readonly lease: HeldLease;
      /** acquired: it was free; taken_over: another member let it expire. */
      readonly event: 'acquired' | 'taken_over';
      readonly previous: string | null;
    }
  | {
      readonly lease: null;
      /** The member that holds it (alive, or expired with a transaction still in flight). */
      readonly heldBy: string | null;
      /** When the lease it holds expires unless renewed (ms from now); null if not held. */
      readonly expiresInMs: number | null;
      /** Buffer sessions of an expired owner terminated to free the lease row (see below). */
      readonly terminated: number;
    };

/**
 * Takes the source's lease if it is free, expired, or already this member's, always with a new
 * epoch: every reader run stores under an epoch of its own, so a store left over from an
 * earlier run is fenced too. A lease another live member holds is seen without a lock, so that
 * standbys asking for it never delay the owner's stores.
 *
 * Taking the row over waits for every fenced transaction in flight (see docs/design/leases.md),
 * at most a second here. An expired owner whose transaction holds the row that long is frozen
 * (a stopped process, a paused VM): its buffer sessions are terminated — safe, since its lease
 * has expired and whatever it was storing is not committed — and the caller asks again.
 */
export async function acquireLease(
  pool: pg.Pool,
  memberId: string,
  sourceId: string,
  ttlMs: number,
  /**
   * Asked, once the lease looks free, whether to take it, with how long nobody has held it
   * (Infinity for a source never owned): the caller's share decides, and it may reserve room
   * synchronously here. Not asked for a lease another live member holds.
   */
  admit: (unownedForMs: number) => boolean = () => true,
): Promise<AcquireResult> {
  const client = await pool.connect();
  let broken: Error | undefined;
  let other: string | null = null;
  try {
    const seen = await client.query<{ owner: string | null; expires_in_ms: number }>(
      `SELECT owner, (extract(epoch FROM expires_at - now()) * 1000)::float8 AS expires_in_ms
         FROM cdc_leases WHERE source_id = $1`,
      [sourceId],
    );
    const current = seen.rows[0];
    const expiresInMs = current?.owner == null ? null : current.expires_in_ms;
    if (current?.owner != null && current.owner !== memberId) other = current.owner;
    if (other !== null && current!.expires_in_ms > 0)
      return { lease: null, heldBy: other, expiresInMs, terminated: 0 };
    // A source never owned (no row) has been unowned for as long as anyone can tell.
    const unownedFor =
      current === undefined ? Infinity : current.owner === memberId ? 0 : -current.expires_in_ms;
    if (!admit(unownedFor)) return { lease: null, heldBy: other, expiresInMs, terminated: 0 };
    await client.query(`BEGIN; SET LOCAL lock_timeout = '1s'`);
    const result = await client.query<{ epoch: string; previous: string | null }>(
      `WITH before AS (SELECT owner FROM cdc_leases WHERE source_id = $2)
       INSERT INTO cdc_leases AS l (source_id, owner, epoch, acquired_at, expires_at)
       VALUES ($2, $1, 1, now(), now() + ${ms('$3')})
       ON CONFLICT (source_id) DO UPDATE
          SET owner = EXCLUDED.owner, epoch = l.epoch + 1, acquired_at = now(),
              expires_at = EXCLUDED.expires_at
        WHERE l.owner IS NULL OR l.owner = EXCLUDED.owner OR l.expires_at < now()
       RETURNING l.epoch::text, (SELECT owner FROM before) AS previous`,
      [memberId, sourceId, ttlMs],
    );
    const row = result.rows[0];
    if (!row) {
      await client.query('ROLLBACK');
      return { lease: null, heldBy: other, expiresInMs: null, terminated: 0 };
    }
    // A lease released has no owner: only one that expired under another member is taken over.
    const event =
      row.previous === null ? 'acquired' : row.previous === memberId ? 'renewed_run' : 'taken_over';
    await client.query(
      `INSERT INTO cdc_lease_history (source_id, owner, epoch, event) VALUES ($1, $2, $3, $4)`,
      [sourceId, memberId, row.epoch, event],
    );
    await client.query('COMMIT');
    return {
      lease: { sourceId, epoch: row.epoch },
      event: event === 'taken_over' ? 'taken_over' : 'acquired',
      previous: row.previous,
    };
  } catch (error) {
    if ((error as { code?: unknown }).code !== '55P03') {
      // A connection that failed (or timed out) mid-statement is not reused.
      broken = error as Error;
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    }
    // lock_timeout: an expired owner's transaction still holds the row.
    await client.query('ROLLBACK');
    const terminated = other === null ? 0 : await terminateExpired(client, sourceId, other);
    return { lease: null, heldBy: other, expiresInMs: null, terminated };
  } finally {
    client.release(broken);
  }
}

/** The application_name of a member's buffer sessions: how a stale one is found. */
export function bufferApplicationName(memberId: string): string {
  return `philotes:buffer:${memberId.slice(memberId.lastIndexOf(':') + 1)}`;
}

/**
 * Terminates the buffer sessions of `owner` that are in a transaction (only those can hold the
 * row), if its lease of `sourceId` is still expired at this
 * very statement (a renewal since would have made it live again). Needs the same buffer role as
 * that member, or pg_signal_backend; without it, nothing is terminated and the lease waits for
 * the frozen session to end.
 */
async function terminateExpired(
  client: pg.PoolClient,
  sourceId: string,
  owner: string,
): Promise<number> {
  const result = await client
    .query<{ n: number }>(
      `SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid))::int AS n
         FROM pg_stat_activity a
        WHERE a.application_name = $3 AND a.datname = current_database()
          AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
          AND EXISTS (SELECT 1 FROM cdc_leases
                       WHERE source_id = $1 AND owner = $2 AND expires_at < now())`,
      [sourceId, owner, bufferApplicationName(owner)],
    )
    .catch(() => null);
  return result?.rows[0]?.n ?? 0;
}

/** The channel a released lease is announced on, so that standbys take it at once. */
export const LEASES_CHANNEL = 'philotes_leases';

/**
 * Gives a lease back (after the reader stopped and stored what it had): free for anyone, and
 * said on LEASES_CHANNEL. The NOTIFY is in this short transaction of its own, never in a
 * capture transaction (it takes a global lock at commit).
 */
export async function releaseLease(
  pool: pg.Pool,
  memberId: string,
  lease: HeldLease,
): Promise<void> {
  await pool.query(
    `WITH r AS (
       UPDATE cdc_leases SET owner = NULL, expires_at = now()
        WHERE source_id = $2 AND owner = $1 AND epoch = $3::bigint
       RETURNING source_id, epoch),
     h AS (
       INSERT INTO cdc_lease_history (source_id, owner, epoch, event)
       SELECT source_id, $1, epoch, 'released' FROM r)
     SELECT pg_notify('${LEASES_CHANNEL}', source_id) FROM r`,
    [memberId, lease.sourceId, lease.epoch],
  );
}

/**
 * At start: members on this host whose process is gone (killed, or this container's earlier
 * run, which had this very pid) hold their leases until the TTL runs out; nobody else can use
 * them, so they are expired now and the restarted process takes its sources at once. A wrong
 * guess only costs that member its leases: the fence keeps the data exact either way.
 */
export async function expireGoneMembers(
  pool: pg.Pool,
  self: Member,
  /** Whether the member with this id and pid (on this host) no longer runs. */
  isGone: (member: { id: string; pid: number }) => boolean,
): Promise<string[]> {
  const rows = await pool.query<{ id: string; pid: number }>(
    `SELECT id, pid FROM cdc_members WHERE host = $1 AND id <> $2 AND expires_at > now()`,
    [self.host, self.id],
  );
  const gone = rows.rows.filter((m) => isGone(m)).map((m) => m.id);
  if (gone.length === 0) return [];
  await pool.query(
    `WITH l AS (UPDATE cdc_leases SET expires_at = now() - interval '1 millisecond'
                 WHERE owner = ANY($1) AND expires_at > now() RETURNING source_id)
     UPDATE cdc_members SET expires_at = now() - interval '1 millisecond' WHERE id = ANY($1)`,
    [gone],
  );
  return gone;
}

/** A clean stop: the member leaves (its leases are released one by one before). */
export async function leaveMembers(pool: pg.Pool, memberId: string): Promise<void> {
  await pool.query('DELETE FROM cdc_members WHERE id = $1', [memberId]);
}

/** A source's lease as the buffer holds it, with its owner's member row if it has one. */
export interface LeaseRow {
  readonly sourceId: string;
  readonly owner: string | null;
  readonly epoch: string;
  readonly host: string | null;
  readonly pid: number | null;
  /** Milliseconds until it expires under the buffer's clock; negative once expired. */
  readonly expiresInMs: number;
}

/** Every lease, or one source's (reads: status, check, the commands' messages). */
export async function readLeases(
  db: pg.Pool | pg.ClientBase,
  sourceId?: string,
): Promise<LeaseRow[]> {
  const result = await db.query<{
    source_id: string;
    owner: string | null;
    epoch: string;
    host: string | null;
    pid: number | null;
    expires_in_ms: number;
  }>(
    `SELECT l.source_id, l.owner, l.epoch::text, m.host, m.pid,
            (extract(epoch FROM l.expires_at - now()) * 1000)::float8 AS expires_in_ms
       FROM cdc_leases l LEFT JOIN cdc_members m ON m.id = l.owner
      WHERE $1::text IS NULL OR l.source_id = $1
      ORDER BY l.source_id`,
    [sourceId ?? null],
  );
  return result.rows.map((r) => ({
    sourceId: r.source_id,
    owner: r.owner,
    epoch: r.epoch,
    host: r.host,
    pid: r.pid,
    expiresInMs: r.expires_in_ms,
  }));
}

/** "member M (host H, pid P)", for messages. */
export function describeOwner(lease: LeaseRow): string {
  const where = lease.host !== null ? ` on host ${lease.host}, pid ${lease.pid}` : '';
  return `member ${lease.owner}${where} holds its lease`;
}

/** A member row, for `status`. */
export interface MemberRow {
  readonly id: string;
  readonly role: string;
  readonly host: string;
  readonly pid: number;
  readonly version: string;
  readonly startedAt: string;
  /** Seconds since its last renewal. */
  readonly heartbeatAgeSeconds: number;
  readonly live: boolean;
  /** Leases it holds that have not expired. */
  readonly sources: number;
}

/** The members the buffer knows of, live ones first (empty before migration 8). */
export async function readMembers(db: pg.ClientBase): Promise<MemberRow[]> {
  const exists = await db.query<{ ok: boolean }>(
    `SELECT to_regclass('cdc_members') IS NOT NULL AS ok`,
  );
  if (exists.rows[0]?.ok !== true) return [];
  const result = await db.query<MemberRow>(
    `SELECT m.id, m.role, m.host, m.pid, m.version, m.started_at::text AS "startedAt",
            extract(epoch FROM now() - m.heartbeat_at)::int AS "heartbeatAgeSeconds",
            m.expires_at > now() AS live,
            (SELECT count(*)::int FROM cdc_leases l
              WHERE l.owner = m.id AND l.expires_at > now()) AS sources
       FROM cdc_members m ORDER BY m.expires_at > now() DESC, m.started_at`,
  );
  return result.rows;
}

/**
 * The lease statements on a pool of their own (a renewal never queues behind long transactions):
 * what the lease keeper (src/supervisor/lease-keeper.ts) uses, for a capturing process as for a
 * consumer.
 */
export class PoolLeases {
  constructor(private readonly pool: pg.Pool) {}

  /** Registers or refreshes this member and renews its leases, in one statement. */
  renewLeases(
    member: Member,
    ttlMs: number,
    capacity: number,
    leaving = false,
  ): ReturnType<typeof renewLeases> {
    return renewLeases(this.pool, member, ttlMs, capacity, leaving);
  }

  /** Expires the leases of members of this host whose process is gone. */
  expireGoneMembers(
    self: Member,
    isGone: (member: { id: string; pid: number }) => boolean,
  ): Promise<string[]> {
    return expireGoneMembers(this.pool, self, isGone);
  }

  /** Takes a lease with a new epoch; null if another live member holds it. */
  acquireLease(
    memberId: string,
    sourceId: string,
    ttlMs: number,
    admit?: (unownedForMs: number) => boolean,
  ): Promise<AcquireResult> {
    return acquireLease(this.pool, memberId, sourceId, ttlMs, admit);
  }

  releaseLease(memberId: string, lease: HeldLease): Promise<void> {
    return releaseLease(this.pool, memberId, lease);
  }

  leaveMembers(memberId: string): Promise<void> {
    return leaveMembers(this.pool, memberId);
  }
}
