/**
 * `philotes-worker status`: what every configured source looks like right now, read from the
 * buffer (its checkpoint) and from the source (its slot), without changing anything and without a
 * running worker. Each source is read on its own connections, all at once; one that cannot be
 * reached says why in its row and does not hide the others.
 */
import pg from 'pg';
import {
  durableRecordOf,
  readCheckpoints,
  readLatestSnapshots,
  type CheckpointRow,
  type StoredSnapshot,
} from '../../buffer/reads.js';

export type { StoredSnapshot } from '../../buffer/reads.js';
import type { Config, SourceConfig } from '../../common/config.js';
import { describeConnectionError, type FatalSourceError } from '../../common/errors.js';
import { formatLsn, parseLsn } from '../../common/lsn.js';
import { pgClientOptions } from '../../common/pg-connection.js';
import {
  compareHistory,
  divergenceSummary,
  storedHistoryOfRow,
} from '../../common/source-history.js';
import { fixFor } from '../../common/error-policy.js';
import {
  currentWalLsn,
  resetCommand,
  readSlotState,
  retainedWalBytes,
  slotHolder,
  slotVerdict,
  type SlotState,
} from '../../common/source-admin.js';
import { isCurrent, readSourceStatus, type ReportedStatus } from '../../buffer/source-status.js';
import { readLeases, readMembers, type LeaseRow, type MemberRow } from '../../buffer/leases.js';
import { readConsumerLag, type ConsumerLag } from '../../buffer/consumer-stats.js';
import { bufferSize, type BufferSize } from '../../buffer/partitions.js';

export type { MemberRow } from '../../buffer/leases.js';
export type { ConsumerLag } from '../../buffer/consumer-stats.js';
export type { BufferSize } from '../../buffer/partitions.js';

export interface SourceStatus {
  readonly source: string;
  readonly slot: string;
  /** The replica that holds the source's lease (host:pid), null when none holds it now. */
  readonly owner: string | null;
  /** The stored checkpoint (end of the last stored transaction), null before the first. */
  readonly checkpointLsn: string | null;
  /** When the checkpoint was last moved, and the source commit time of that transaction. */
  readonly checkpointStoredAt: string | null;
  readonly checkpointAgeSeconds: number | null;
  readonly lastSourceCommitAt: string | null;
  /** The source's WAL position now, and how far behind the captured position it is. */
  readonly walLsn: string | null;
  readonly lagBytes: number | null;
  readonly slotExists: boolean | null;
  readonly slotActive: boolean | null;
  /** The slot was created with FAILOVER (PostgreSQL 17+; null before, or no slot). */
  readonly slotFailover: boolean | null;
  /** Who holds the slot: application name, address and PID of its walsender's client. */
  readonly slotOwner: string | null;
  readonly walStatus: string | null;
  readonly retainedWalBytes: number | null;
  /**
   * What is wrong, if anything: what could not be read (the source, or the buffer for this
   * source), or a server that is not the history the buffer holds (SOURCE_DIVERGED, ...).
   */
  readonly problem: string | null;
  /** SOURCE_DIVERGED or SOURCE_REPLACED when the server is not the buffer's history. */
  readonly historyCode: string | null;
  /** The source's latest snapshot as the buffer records it, if it had one. */
  readonly snapshot: StoredSnapshot | null;
  /**
   * What the running Philotes process says about it (cdc_source_status), if one has reported in
   * the last minute: its state, since when, and its last error.
   */
  readonly reported: ReportedStatus | null;
}

/** Reads the status of every configured source; `problems` names what could not be read. */
export async function readStatus(config: Config): Promise<{
  buffer: string | null;
  sources: SourceStatus[];
  members: MemberRow[];
  consumers: ConsumerLag[];
  events: BufferSize | null;
}> {
  const now = Date.now();
  let checkpoints = new Map<string, CheckpointRow>();
  let snapshots = new Map<string, StoredSnapshot>();
  let reports = new Map<string, ReportedStatus[]>();
  let leases = new Map<string, LeaseRow>();
  let members: MemberRow[] = [];
  let consumers: ConsumerLag[] = [];
  let events: BufferSize | null = null;
  let bufferProblem: string | null = null;
  try {
    ({ checkpoints, snapshots, reports, leases, members, consumers, events } =
      await readBuffer(config));
  } catch (error) {
    bufferProblem = explain(error, 'buffer', config.buffer.host, config.buffer.port);
  }
  const sources = await Promise.all(
    config.sources.map((source) =>
      sourceStatus(
        source,
        checkpoints.get(source.id) ?? null,
        snapshots.get(source.id) ?? null,
        activeReport(reports.get(source.id) ?? []),
        leases.get(source.id) ?? null,
        bufferProblem,
        now,
      ),
    ),
  );
  return { buffer: bufferProblem, sources, members, consumers, events };
}

async function readBuffer(config: Config): Promise<{
  checkpoints: Map<string, CheckpointRow>;
  snapshots: Map<string, StoredSnapshot>;
  reports: Map<string, ReportedStatus[]>;
  leases: Map<string, LeaseRow>;
  members: MemberRow[];
  consumers: ConsumerLag[];
  events: BufferSize | null;
}> {
  const client = new pg.Client(pgClientOptions(config.buffer, 'philotes:status'));
  client.on('error', () => undefined); // a lost connection rejects the query in flight
  await client.connect();
  try {
    // Read only: a buffer Philotes never started on has no tables yet, which is no error here.
    const ids = config.sources.map((s) => s.id);
    const reports = new Map<string, ReportedStatus[]>();
    for (const id of ids) reports.set(id, await readSourceStatus(client, id));
    const members = await readMembers(client);
    // Live leases only: an expired one is nobody's.
    const leases = new Map(
      members.length === 0
        ? []
        : (await readLeases(client))
            .filter((l) => l.owner !== null && l.expiresInMs > 0)
            .map((l) => [l.sourceId, l] as const),
    );
    const hasEvents = await client.query<{ ok: boolean }>(
      `SELECT to_regclass('cdc_events') IS NOT NULL AS ok`,
    );
    return {
      checkpoints: await readCheckpoints(client, ids),
      snapshots: await readLatestSnapshots(client, ids),
      reports,
      leases,
      members,
      consumers: await readConsumerLag(client),
      events: hasEvents.rows[0]?.ok === true ? await bufferSize(client) : null,
    };
  } finally {
    await client.end().catch(() => undefined);
  }
}

async function sourceStatus(
  source: SourceConfig,
  checkpoint: CheckpointRow | null,
  snapshot: StoredSnapshot | null,
  reported: ReportedStatus | null,
  lease: LeaseRow | null,
  bufferProblem: string | null,
  now: number,
): Promise<SourceStatus> {
  const stored = checkpoint?.committed_at ?? null;
  const base = {
    source: source.id,
    slot: source.slot,
    owner: lease === null ? null : lease.host !== null ? `${lease.host}:${lease.pid}` : lease.owner,
    checkpointLsn: checkpoint?.lsn ?? null,
    checkpointStoredAt: stored?.toISOString() ?? null,
    checkpointAgeSeconds: stored === null ? null : Math.round((now - stored.getTime()) / 1000),
    lastSourceCommitAt: checkpoint?.metadata?.source_committed_at ?? null,
    snapshot,
    reported,
  };
  const client = new pg.Client(pgClientOptions(source.connection, `philotes:status`));
  client.on('error', () => undefined);
  try {
    await client.connect();
    const slot = await readSlotState(client, source.slot);
    const wal = await currentWalLsn(client);
    let owner: string | null = null;
    if (slot?.activePid != null) {
      const who = await slotHolder(client, slot.activePid);
      owner = `${who.applicationName || 'unknown'}${who.address ? ` @ ${who.address}` : ''} (pid ${slot.activePid})`;
    }
    // Captured: whichever is further of the stored checkpoint and what Philotes may have
    // confirmed past it (an idle source's WAL end).
    const positions = [checkpoint?.lsn, checkpoint?.confirmed_lsn]
      .filter((p): p is string => typeof p === 'string')
      .map(parseLsn);
    const captured = positions.length > 0 ? positions.reduce((a, b) => (a > b ? a : b)) : null;
    let history: FatalSourceError | null = null;
    let historyProblem: string | null = null;
    if (checkpoint !== null) {
      const stored = storedHistoryOfRow(checkpoint.row);
      try {
        history = (await compareHistory(client, source, 'philotes:status', stored)).error;
      } catch (error) {
        historyProblem = `could not compare the server's history with the buffer's: ${(error as Error).message}`;
      }
    }
    return {
      ...base,
      walLsn: formatLsn(wal),
      lagBytes: captured === null ? null : Math.max(0, Number(wal - captured)),
      slotExists: slot !== null,
      slotActive: slot?.active ?? null,
      slotFailover: slot?.failover ?? null,
      slotOwner: owner,
      walStatus: slot?.walStatus ?? null,
      retainedWalBytes: slot === null ? null : retainedWalBytes(slot, wal),
      problem:
        bufferProblem !== null
          ? `buffer: ${bufferProblem}`
          : history !== null
            ? `${divergenceSummary(history)} (way out: ${resetCommand(source)})`
            : (historyProblem ?? streamingProblem(source, slot, wal, checkpoint, owner, reported)),
      historyCode: history?.code ?? null,
    };
  } catch (error) {
    return {
      ...base,
      walLsn: null,
      lagBytes: null,
      slotExists: null,
      slotActive: null,
      slotFailover: null,
      slotOwner: null,
      walStatus: null,
      retainedWalBytes: null,
      problem: explain(error, 'source', source.connection.host, source.connection.port),
      historyCode: null,
    };
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** The report that speaks for the source now: a current one, the capturing process's first. */
function activeReport(reports: readonly ReportedStatus[]): ReportedStatus | null {
  const current = reports.filter(isCurrent);
  return current.find((r) => r.state !== 'standby') ?? current[0] ?? null;
}

function explain(error: unknown, side: 'source' | 'buffer', host: string, port: number): string {
  const described = describeConnectionError(error, side, host, port);
  return described instanceof Error ? described.message : String(described);
}

/**
 * Why the source is not streaming now, if it is not: the slot verdict a start would throw (the
 * same rule, slotVerdict), or a slot no client streams (Philotes stopped, failing, or in backoff:
 * its log and /readyz say why), or a slot another program holds.
 */
function streamingProblem(
  source: SourceConfig,
  slot: SlotState | null,
  wal: bigint,
  checkpoint: CheckpointRow | null,
  owner: string | null,
  reported: ReportedStatus | null,
): string | null {
  const verdict = slotVerdict(
    source,
    slot,
    wal,
    checkpoint === null ? null : durableRecordOf(checkpoint),
  );
  if (verdict !== null)
    return `${verdict.error.code}: ${verdict.what} (way out: ${fixFor(verdict.error.code, source)})`;
  // The run that would stream it says why it does not (a first start failing has no slot yet).
  if ((slot === null || !slot.active) && reported !== null && reported.state !== 'streaming') {
    const error =
      reported.lastError === null
        ? ''
        : `: ${reported.lastErrorCode ? `${reported.lastErrorCode}: ` : ''}${reported.lastError}`;
    const fix = fixFor(reported.lastErrorCode, source);
    return `not streaming: Philotes on ${reported.reporter} reports it ${reported.state} since ${reported.since}${error}${fix ? ` (fix: ${fix})` : ''}`;
  }
  if (slot === null)
    return `not streaming: slot ${source.slot} does not exist yet (a first start creates it)`;
  if (!slot.active)
    return `not streaming: no client streams slot ${source.slot} (no Philotes reports this source: stopped, or not started on this buffer)`;
  if (owner !== null && !owner.startsWith('philotes'))
    return `not streaming: slot ${source.slot} is held by ${owner}, not by Philotes`;
  return null;
}
