/**
 * Whether the server a source points at is still the history the buffer holds. A leaf module:
 * the reader uses it before streaming, `reset-source` and `check` to say what happened.
 *
 * Why it is needed: positions alone do not tell histories apart. A data directory restored from
 * a disk snapshot, an asynchronous standby promoted after a failover, or a dump restored into a
 * new cluster can have its WAL *behind* the buffer's checkpoint; streaming from the checkpoint
 * then skips every commit below it without a word, and the buffer keeps events of a history
 * that no longer exists. What tells them apart (see docs/design/source-history.md):
 *
 * - the system identifier (a new cluster: initdb, dump/restore) and the database's oid (the
 *   database dropped and created again);
 * - the timeline and, when it changed, the fork point from `TIMELINE_HISTORY`: where the
 *   buffer's timeline ended in the server's history;
 * - the server's WAL position against the checkpoint, and its next transaction id against the
 *   last one stored (a server that never assigned that xid has not lived that history).
 */
import pg from 'pg';
import { supports } from './server-features.js';
import { FatalSourceError } from './errors.js';
import { formatBytes, formatLsn, parseLsn } from './lsn.js';
import { pgClientOptions } from './pg-connection.js';
import { resetCommand, where } from './source-admin.js';
import type { SourceConfig } from './config.js';

/** Which server and database a source's changes come from. */
export interface SourceIdentity {
  /** pg_control's system identifier: a new one for every initdb (and so every dump/restore). */
  readonly systemId: string;
  /** The WAL timeline: a promotion or a point-in-time recovery starts a new one. */
  readonly timeline: number;
  /** The database's oid: a database dropped and created again under its name has a new one. */
  readonly databaseOid: number;
}

/** The server as it is now. */
export interface ServerHistory {
  readonly identity: SourceIdentity;
  /** Its WAL position now (replay position on a standby). */
  readonly walLsn: bigint;
  /** Its next transaction id (64 bits: epoch and xid). */
  readonly nextXid: bigint;
  /**
   * Where each earlier timeline ended in this server's history (its timeline's history file),
   * read only when the timeline is not the one the buffer recorded; null otherwise.
   */
  readonly forks: ReadonlyMap<number, bigint> | null;
}

/** What the buffer holds of a source's history. */
export interface StoredHistory {
  /** Null: recorded by a Philotes that did not record identities (trusted once, then recorded). */
  readonly identity: SourceIdentity | null;
  readonly checkpointLsn: bigint;
  /** The furthest position Philotes may have confirmed (never behind the checkpoint). */
  readonly confirmedLsn: bigint;
  /** The last stored transaction's xid (64 bits, see fullXid); null if none. */
  readonly checkpointXid: number | null;
}

export type DivergenceKind = 'replaced' | 'diverged';

export interface Divergence {
  /** replaced: another cluster or database; diverged: the same one with another history. */
  readonly kind: DivergenceKind;
  readonly why: 'system_identifier' | 'database' | 'timeline' | 'wal_behind' | 'xid_behind';
  /**
   * The buffer's events below this position are on the server's history too, as far as the
   * server can tell; those at or past it are from a history that no longer exists. The way out
   * lowers it to the slot's position where the slot is older (see reset-source).
   */
  readonly forkLsn: bigint;
  /** Whether forkLsn is the server's own word (a timeline fork) or the best bound positions give. */
  readonly forkKnown: boolean;
}

/** Parses a timeline history file: "<timeline>\t<switch point>\t<reason>" per line. */
export function parseTimelineHistory(content: string): Map<number, bigint> {
  const forks = new Map<number, bigint>();
  for (const line of content.split('\n')) {
    const m = /^\s*(\d+)\s+([0-9A-Fa-f]+\/[0-9A-Fa-f]+)/.exec(line);
    if (m) forks.set(Number(m[1]), parseLsn(m[2]!));
  }
  return forks;
}

/**
 * Reads the server's identity and position. `replication` is the source's connection options;
 * IDENTIFY_SYSTEM and TIMELINE_HISTORY need a replication connection (the REPLICATION attribute
 * Philotes needs anyway), where pg_control_system() may be denied to a non-superuser.
 */
export async function readServerHistory(
  client: pg.Client,
  replication: pg.ClientConfig,
  recordedTimeline: number | null,
): Promise<ServerHistory> {
  const db = await client.query<{ oid: string; version: string }>(
    `SELECT d.oid::text AS oid, current_setting('server_version_num') AS version
       FROM pg_database d WHERE d.datname = current_database()`,
  );
  const version = Number(db.rows[0]!.version);
  const nextXid = await readNextXid(client, version);
  const wal = await client.query<{ wal: string }>(
    `SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                  ELSE pg_current_wal_lsn() END)::text AS wal`,
  );
  const walsender = new pg.Client({ ...replication, replication: 'database' } as pg.ClientConfig);
  walsender.on('error', () => undefined); // a lost connection rejects the query in flight
  await walsender.connect();
  try {
    const id = await walsender.query<{ systemid: string; timeline: string | number }>(
      'IDENTIFY_SYSTEM',
    );
    const row = id.rows[0]!;
    const timeline = Number(row.timeline);
    let forks: Map<number, bigint> | null = null;
    if (recordedTimeline !== null && timeline !== recordedTimeline && timeline > 1) {
      const history = await walsender.query<{ content: string | Buffer }>(
        `TIMELINE_HISTORY ${timeline}`,
      );
      const content = history.rows[0]?.content;
      forks = parseTimelineHistory(
        content === undefined ? '' : Buffer.isBuffer(content) ? content.toString('utf8') : content,
      );
    }
    return {
      identity: { systemId: row.systemid, timeline, databaseOid: Number(db.rows[0]!.oid) },
      walLsn: parseLsn(wal.rows[0]!.wal),
      nextXid,
      forks,
    };
  } finally {
    await walsender.end().catch(() => undefined);
  }
}

/**
 * A 32-bit xid from the stream as the 64-bit (epoch and xid) one it is, given a 64-bit xid of the
 * server read near the same time (`reference`): the nearest value with the same low 32 bits.
 * Exact for any xid within 2^31 of the reference, which a transaction the stream delivers is
 * (its xid was assigned shortly before its commit, and the reference is read at least every few
 * seconds).
 */
export function fullXid(xid: number, reference: bigint): bigint {
  let diff = (BigInt(xid >>> 0) - reference) & 0xffffffffn;
  if (diff >= 0x80000000n) diff -= 0x100000000n;
  const full = reference + diff;
  return full < 0n ? BigInt(xid >>> 0) : full;
}

/**
 * Whether an xid the buffer stored is one the server has assigned, given its next 64-bit xid.
 * Stored xids are 64-bit (fullXid) from issue 19 on, compared as numbers: no wraparound. One
 * written earlier holds the 32 low bits only; it is never taken for a divergence unless the
 * server is still in epoch 0, where the two agree.
 */
export function xidAssigned(xid: number, nextXid: bigint): boolean {
  return BigInt(xid) < nextXid;
}

/** The server's next 64-bit xid (PostgreSQL 13+ has pg_snapshot; txid_ before). */
export async function readNextXid(client: pg.Client, serverVersion: number): Promise<bigint> {
  const result = await client.query<{ xid: string }>(
    `SELECT ${supports(serverVersion, 'xid8Snapshots') ? 'pg_snapshot_xmax(pg_current_snapshot())' : 'txid_snapshot_xmax(txid_current_snapshot())'}::text AS xid`,
  );
  return BigInt(result.rows[0]!.xid);
}

/**
 * Whether the server's history is not the one the buffer holds. Null: the same history, as far
 * as the server can tell (or nothing to compare with yet).
 */
export function findDivergence(stored: StoredHistory, server: ServerHistory): Divergence | null {
  const known = stored.identity;
  const now = server.identity;
  const checkpoint = stored.checkpointLsn;
  const lower = (lsn: bigint): bigint => (lsn < checkpoint ? lsn : checkpoint);
  if (known !== null && known.systemId !== now.systemId)
    return {
      kind: 'replaced',
      why: 'system_identifier',
      forkLsn: lower(server.walLsn),
      forkKnown: false,
    };
  if (known !== null && known.databaseOid !== now.databaseOid)
    return { kind: 'replaced', why: 'database', forkLsn: lower(server.walLsn), forkKnown: false };
  if (known !== null && known.timeline !== now.timeline) {
    // The server's history says where the buffer's timeline ended in it. Not in it at all (a
    // sibling branch, or a timeline that went backwards): nothing after its start is shared.
    const fork = now.timeline > known.timeline ? server.forks?.get(known.timeline) : undefined;
    if (fork === undefined)
      return { kind: 'diverged', why: 'timeline', forkLsn: lower(server.walLsn), forkKnown: false };
    if (fork < checkpoint)
      return { kind: 'diverged', why: 'timeline', forkLsn: fork, forkKnown: true };
  }
  if (server.walLsn < checkpoint)
    return { kind: 'diverged', why: 'wal_behind', forkLsn: server.walLsn, forkKnown: false };
  // 0, 1, 2 are not transactions (invalid, bootstrap, frozen): a checkpoint a standalone
  // message set holds 0.
  if (
    stored.checkpointXid !== null &&
    stored.checkpointXid >= 3 &&
    !xidAssigned(stored.checkpointXid, server.nextXid)
  )
    return { kind: 'diverged', why: 'xid_behind', forkLsn: checkpoint, forkKnown: false };
  return null;
}

/**
 * The furthest position Philotes may have confirmed on this server's history: where a timeline
 * forked before an idle confirmation recorded on the old one, the fork (what lies past it on the
 * old timeline is not this server's WAL).
 */
export function confirmedOnHistory(stored: StoredHistory, server: ServerHistory): bigint {
  const known = stored.identity;
  if (known === null || known.timeline === server.identity.timeline) return stored.confirmedLsn;
  const fork = server.forks?.get(known.timeline);
  if (fork === undefined || fork >= stored.confirmedLsn) return stored.confirmedLsn;
  return fork > stored.checkpointLsn ? fork : stored.checkpointLsn;
}

function describe(d: Divergence, stored: StoredHistory, server: ServerHistory): string {
  const known = stored.identity!;
  const now = server.identity;
  const checkpoint = formatLsn(stored.checkpointLsn);
  const wal = formatLsn(server.walLsn);
  switch (d.why) {
    case 'system_identifier':
      return `is another cluster than the one the buffer's events came from (system identifier ${now.systemId}, the buffer's ${known.systemId}): was it restored from a dump into a new cluster, or is the configuration pointing at another server? Its WAL positions (now ${wal}) have nothing to do with the buffer's (checkpoint ${checkpoint})`;
    case 'database':
      return `holds another database under the same name (oid ${now.databaseOid}, the buffer's ${known.databaseOid}): it was dropped and created again (a restore?) since the buffer's checkpoint ${checkpoint}`;
    case 'timeline':
      return d.forkKnown
        ? `is on timeline ${now.timeline}, which left the buffer's timeline ${known.timeline} at ${formatLsn(d.forkLsn)}, before the buffer's checkpoint ${checkpoint}: a failover to a standby that was behind, or a point-in-time recovery. The buffer's events from ${formatLsn(d.forkLsn)} to ${checkpoint} (${formatBytes(stored.checkpointLsn - d.forkLsn)} of WAL) are from a history that no longer exists`
        : `is on timeline ${now.timeline}, whose history does not contain the buffer's timeline ${known.timeline} (the buffer's checkpoint ${checkpoint}): the server is on another branch of history`;
    case 'wal_behind':
      return `has its WAL at ${wal}, behind the buffer's checkpoint ${checkpoint} (${formatBytes(stored.checkpointLsn - server.walLsn)} of WAL): was it restored from a backup or disk snapshot, or failed over to a standby that was behind? The buffer's events past ${wal} are from a history that no longer exists, and changes committed on the server since would be skipped`;
    case 'xid_behind':
      return `has never assigned transaction ${stored.checkpointXid}, the last one the buffer stored (its next is ${server.nextXid}; WAL now ${wal}, checkpoint ${checkpoint}): it was restored from a backup or disk snapshot taken before that transaction, and has since written past the checkpoint. The buffer's latest events are from a history that no longer exists`;
  }
}

/** The fatal error for a diverged or replaced source: both histories' positions and the way out. */
export function divergenceError(
  source: SourceConfig,
  d: Divergence,
  stored: StoredHistory,
  server: ServerHistory,
): FatalSourceError {
  const known = stored.identity;
  return new FatalSourceError(
    `stopped to avoid a silent gap: ${where(source)} ${describe(d, stored, server)}. To retract the buffer's events of the lost history (moved to cdc_retracted_events, the range recorded in cdc_gaps), record what was lost, and resume on the server's history: ${resetCommand(source)}${d.kind === 'replaced' ? " --snapshot (the new server's rows are copied again), or give the new server a new source id" : ''}`,
    d.kind === 'replaced' ? 'SOURCE_REPLACED' : 'SOURCE_DIVERGED',
    {
      why: d.why,
      forkLsn: formatLsn(d.forkLsn),
      forkKnown: d.forkKnown,
      checkpointLsn: formatLsn(stored.checkpointLsn),
      serverWalLsn: formatLsn(server.walLsn),
      bufferSystemId: known?.systemId ?? null,
      serverSystemId: server.identity.systemId,
      bufferTimeline: known?.timeline ?? null,
      serverTimeline: server.identity.timeline,
      bufferDatabaseOid: known?.databaseOid ?? null,
      serverDatabaseOid: server.identity.databaseOid,
      slot: source.slot,
    },
  );
}

/** The identity columns of a cdc_checkpoints row read whole (to_jsonb): null where not recorded. */
export function identityOfRow(row: Record<string, unknown>): SourceIdentity | null {
  const text = (key: string): string | null =>
    typeof row[key] === 'string' || typeof row[key] === 'number' ? String(row[key]) : null;
  const systemId = text('source_system_id');
  const timeline = text('source_timeline');
  const databaseOid = text('source_database_oid');
  return systemId === null || timeline === null || databaseOid === null
    ? null
    : { systemId, timeline: Number(timeline), databaseOid: Number(databaseOid) };
}

/**
 * What the buffer holds, from its checkpoint: the confirmed position never behind the checkpoint
 * (null confirmations: written by a version that did not record them).
 */
export function storedHistory(record: {
  readonly checkpointLsn: bigint;
  readonly confirmedLsn: bigint | null;
  readonly checkpointXid: number | null;
  readonly identity: SourceIdentity | null;
}): StoredHistory {
  const { checkpointLsn, confirmedLsn } = record;
  return {
    identity: record.identity,
    checkpointLsn,
    confirmedLsn:
      confirmedLsn !== null && confirmedLsn > checkpointLsn ? confirmedLsn : checkpointLsn,
    checkpointXid: record.checkpointXid,
  };
}

/** The same from a cdc_checkpoints row read whole (to_jsonb), as `check` and `status` read it. */
export function storedHistoryOfRow(row: Record<string, unknown>): StoredHistory {
  const confirmed = row['confirmed_lsn'];
  const xid = row['transaction_id'];
  return storedHistory({
    checkpointLsn: parseLsn(String(row['lsn'])),
    confirmedLsn: typeof confirmed === 'string' ? parseLsn(confirmed) : null,
    checkpointXid: typeof xid === 'number' ? xid : null,
    identity: identityOfRow(row),
  });
}

/** Reads the server and compares it with what the buffer holds (for `check` and `status`). */
export async function compareHistory(
  client: pg.Client,
  source: SourceConfig,
  applicationName: string,
  stored: StoredHistory,
): Promise<{ server: ServerHistory; error: FatalSourceError | null }> {
  const server = await readServerHistory(
    client,
    pgClientOptions(source.connection, applicationName),
    stored.identity?.timeline ?? null,
  );
  const divergence = findDivergence(stored, server);
  return {
    server,
    error: divergence === null ? null : divergenceError(source, divergence, stored, server),
  };
}

/** A divergence error's account without its way out: for a table cell or a finding. */
export function divergenceSummary(error: FatalSourceError): string {
  return `${error.code}: ${error.message.replace(/^stopped to avoid a silent gap: /, '').replace(/\. To retract.*$/s, '')}`;
}
