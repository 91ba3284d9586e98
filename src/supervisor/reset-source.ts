/**
 * `philotes-worker reset-source --source S --accept-gap`: the explicit way past changes that can
 * no longer be delivered. It finds out why (slot missing, invalidated, advanced by another
 * client, publication missing), gets the slot into a state that can deliver again, records the
 * gap in the buffer (cdc_gaps: source, from, to, when, why) and moves the source's checkpoint
 * to the gap's end, so that capture resumes there. Without --accept-gap it only says what it
 * would record.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import type { Config, SourceConfig } from '../common/config.js';
import { pgClientOptions } from '../common/pg-connection.js';
import { hostname } from 'node:os';
import { BufferStore, describeOwner, newMemberId, type GapRecord } from '../buffer/store.js';
import { LeaseKeeper } from './lease-keeper.js';
import {
  confirmedOnHistory,
  findDivergence,
  readServerHistory,
  storedHistory,
  type Divergence,
  type ServerHistory,
  type StoredHistory,
} from '../common/source-history.js';
import { unknownSource } from '../common/closest.js';
import { CommandError, EXIT_ERROR, EXIT_OK, EXIT_USAGE } from '../common/exit.js';
import type { Logger } from '../common/logger.js';
import { formatBytes, formatLsn, parseLsn } from '../common/lsn.js';
import {
  checkSlotKind,
  createSlot,
  currentWalLsn,
  findGap,
  isInvalidated,
  publicationExists,
  readSlotState,
  where,
  type GapReason,
  type SlotState,
} from '../common/source-admin.js';
import { createPublication } from '../common/publication.js';

export interface ResetOptions {
  readonly sourceId: string;
  readonly acceptGap: boolean;
  /** Skip the slot to the source's current WAL position (a publication dropped and recreated). */
  readonly skipToCurrent: boolean;
  /**
   * With the gap, begin a snapshot of every published table (its reason), in the same buffer
   * transaction: the buffer then rebuilds the tables despite the gap.
   */
  readonly snapshot?: 'on_demand' | 'when_needed';
}

/** What a reset did: the gap it recorded, the events it retracted, the snapshot it began. */
export interface ResetOutcome {
  readonly exitCode: number;
  readonly gap: { id: number; reason: GapReason; fromLsn: string; toLsn: string } | null;
  readonly retraction: { id: number; fromLsn: string; toLsn: string; events: number } | null;
  readonly snapshotId: number | null;
}

const EXPLAIN: Record<GapReason, string> = {
  slot_missing: 'the replication slot does not exist; a new one will be created',
  slot_invalidated:
    'the replication slot has been invalidated; it will be dropped and created anew',
  slot_advanced: 'another client advanced the replication slot past what the buffer holds',
  publication_missing:
    'the publication does not exist; it will be created and the slot skipped past its creation',
  skip_to_current: "the slot will be skipped to the source's current WAL position",
  source_diverged: "the server's history is not the one the buffer holds",
  source_replaced: 'the server is not the one the buffer holds',
};

/** How long to wait for the source's lease before saying another process holds it. */
const LEASE_WAIT_MS = 10_000;

export class ResetError extends CommandError {}

/** Runs the command; resolves with the exit code, having written its report with `out`. */
export async function resetSource(
  config: Config,
  opts: ResetOptions,
  log: Logger,
  out: (line: string) => void,
  version = 'unknown',
): Promise<number> {
  const source = config.sources.find((s) => s.id === opts.sourceId);
  if (!source) {
    throw new ResetError(unknownSource(config, opts.sourceId), EXIT_USAGE);
  }
  const memberId = newMemberId(hostname(), process.pid);
  const store = await BufferStore.open(config.buffer, log, 2, memberId);
  // The command holds the source's lease while it resets, as a member of role 'command' (not
  // counted in the capturing members' fair share), renewed like any other: what it records is
  // fenced, so a running process cannot capture the source meanwhile, nor this command record
  // anything once the lease is lost.
  const keeper = new LeaseKeeper(store.leases, config, log, () => 1, memberId, version, 'command');
  store.book = keeper.book;
  try {
    await keeper.start();
    // A process whose source is failed holds the lease only for a moment at each slow retry:
    // wait that out; one that captures the source holds it for good.
    let held = await keeper.acquire(source.id);
    for (const deadline = Date.now() + LEASE_WAIT_MS; !held && Date.now() < deadline;) {
      await sleep(250);
      held = await keeper.acquire(source.id);
    }
    if (!held) {
      const lease = await store.readLease(source.id);
      const who = lease?.owner ? ` (${describeOwner(lease)})` : '';
      throw new ResetError(
        `source "${source.id}" is being captured by a running Philotes process${who}; stop that process, or wait until it gives the source up, then run reset-source again`,
        EXIT_ERROR,
      );
    }
    const client = new pg.Client(pgClientOptions(source.connection, 'philotes:reset-source'));
    client.on('error', () => undefined); // a lost connection rejects the query in flight
    try {
      await client.connect();
      // The log names the source once, as the supervisor's per-source logger does.
      const sourceLog = log.child({ source: source.id });
      return (await resetWith(store, client, source, opts, sourceLog, out)).exitCode;
    } finally {
      await client.end().catch(() => undefined);
      await keeper.release(held.lease);
    }
  } finally {
    await keeper.stop();
    await store.close();
  }
}

/**
 * The reset itself, for a caller that holds the source's lease and a connection to it: the command
 * above, and a source with `snapshot: when_needed` that recovers from a lost slot by itself.
 */
export async function resetWith(
  store: BufferStore,
  client: pg.Client,
  source: SourceConfig,
  opts: ResetOptions,
  log: Logger,
  out: (line: string) => void,
): Promise<ResetOutcome> {
  const unchanged = (exitCode: number): ResetOutcome => ({
    exitCode,
    gap: null,
    retraction: null,
    snapshotId: null,
  });
  const checkpoint = await store.readCheckpoint(source.id);
  const slot = await readSlotState(client, source.slot);
  if (slot !== null) checkSlotKind(source, slot);
  const hasPublication = await publicationExists(client, source.publication);
  const server = await readServerHistory(
    client,
    pgClientOptions(source.connection, 'philotes:reset-source'),
    checkpoint?.identity?.timeline ?? null,
  );
  const now = server.walLsn;

  const checkpointLsn = checkpoint === null ? null : parseLsn(checkpoint.lsn);
  const stored: StoredHistory | null =
    checkpoint === null || checkpointLsn === null
      ? null
      : storedHistory({
          checkpointLsn,
          confirmedLsn: checkpoint.confirmedLsn === null ? null : parseLsn(checkpoint.confirmedLsn),
          checkpointXid: checkpoint.transactionId,
          identity: checkpoint.identity,
        });
  const divergence = stored === null ? null : findDivergence(stored, server);
  if (stored !== null && divergence !== null)
    return resetDiverged(store, client, source, opts, log, out, {
      stored,
      server,
      divergence,
      slot,
      hasPublication,
    });

  const confirmedLsn = stored === null ? null : confirmedOnHistory(stored, server);
  const found =
    checkpointLsn !== null
      ? findGap({ checkpointLsn, confirmedLsn: confirmedLsn ?? checkpointLsn }, slot, now)
      : null;
  const invalidated = slot !== null && isInvalidated(slot);
  let reason: GapReason | null = found?.reason ?? (invalidated ? 'slot_invalidated' : null);
  if (reason === null && !hasPublication) reason = 'publication_missing';
  if (reason === null && opts.skipToCurrent) reason = 'skip_to_current';
  const at = checkpoint === null ? 'no checkpoint' : `checkpoint ${checkpoint.lsn}`;
  if (reason === null) {
    out(
      `source "${source.id}": nothing to reset: the buffer has ${at} and slot "${source.slot}" on ${where(source)} can deliver every change after it (use --skip-to-current to skip the slot to the source's current position anyway, e.g. after a publication was dropped and created again)`,
    );
    return unchanged(EXIT_OK);
  }
  const fromLsn = found?.fromLsn ?? confirmedLsn ?? slot?.confirmedFlushLsn ?? now;
  if (!opts.acceptGap) {
    const end = found
      ? ` and ${formatLsn(found.toLsn)} (${formatBytes(found.toLsn - found.fromLsn)} of WAL)`
      : '';
    out(
      `source "${source.id}": ${EXPLAIN[reason]}. Changes committed between ${formatLsn(fromLsn)}${end || ' and the new start'} will be recorded as lost in cdc_gaps. Nothing was changed: re-run with --accept-gap to do it.`,
    );
    return unchanged(EXIT_USAGE);
  }

  const { usable, created } = await deliverableSlot(client, source, log, slot, hasPublication);
  let toLsn = usable.confirmedFlushLsn ?? now;
  // A slot that already existed may still have to decode changes from before the publication
  // existed (again): skip it past them. A slot created just now starts after the publication.
  if (!created && (!hasPublication || opts.skipToCurrent)) {
    const target = await currentWalLsn(client);
    const advanced = await client.query<{ lsn: string }>(
      'SELECT end_lsn::text AS lsn FROM pg_replication_slot_advance($1, $2::pg_lsn)',
      [source.slot, formatLsn(target)],
    );
    toLsn = parseLsn(advanced.rows[0]!.lsn);
  }
  // The server's history is the buffer's (checked above), so a slot can only start behind what
  // the buffer holds when its saved position lags what it was confirmed (a crash of the source
  // loses the latest confirmations): it still delivers from the checkpoint on.
  const resume = toLsn < fromLsn ? fromLsn : toLsn;

  const details = {
    server: where(source),
    slotConfirmedFlushLsn:
      slot?.confirmedFlushLsn == null ? null : formatLsn(slot.confirmedFlushLsn),
    slotWalStatus: slot?.walStatus ?? null,
    slotInvalidationReason: slot?.invalidationReason ?? null,
    checkpointLsn: checkpoint?.lsn ?? null,
    confirmedLsn: confirmedLsn === null ? null : formatLsn(confirmedLsn),
    slotCreated: created,
    publicationCreated: !hasPublication,
    gapBytes: Number(resume - fromLsn),
  };
  const recorded = await store.recordGap({
    sourceId: source.id,
    slot: source.slot,
    checkpointLsn: checkpoint?.lsn ?? null,
    gaps: [{ fromLsn: formatLsn(fromLsn), toLsn: formatLsn(resume), reason, details }],
    resumeLsn: formatLsn(resume),
    identity: server.identity,
    snapshot: opts.snapshot ?? null,
  });
  const gapId = recorded.gapIds[0]!;
  log.warn(
    {
      gapId,
      reason,
      fromLsn: formatLsn(fromLsn),
      toLsn: formatLsn(resume),
      snapshot: recorded.snapshotId,
      ...details,
    },
    'gap accepted and recorded in cdc_gaps',
  );
  out(
    `source "${source.id}": ${EXPLAIN[reason]}. Recorded gap #${gapId} in cdc_gaps: changes committed between ${formatLsn(fromLsn)} and ${formatLsn(resume)} (${formatBytes(resume - fromLsn)} of WAL) may be missing from cdc_events. The checkpoint is now ${formatLsn(resume)}: start Philotes and capture resumes there${recorded.snapshotId === null ? '' : `, with snapshot #${recorded.snapshotId} of every published table`}.`,
  );
  return {
    exitCode: EXIT_OK,
    gap: { id: gapId, reason, fromLsn: formatLsn(fromLsn), toLsn: formatLsn(resume) },
    retraction: null,
    snapshotId: recorded.snapshotId,
  };
}

/** The publication and a slot that can deliver: created, or dropped and created if invalidated. */
async function deliverableSlot(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
  slot: SlotState | null,
  hasPublication: boolean,
): Promise<{ usable: SlotState; created: boolean }> {
  if (!hasPublication) await createPublication(client, source, log);
  if (slot !== null && !isInvalidated(slot)) return { usable: slot, created: false };
  if (slot !== null) await client.query('SELECT pg_drop_replication_slot($1)', [source.slot]);
  await createSlot(client, source);
  const usable = await readSlotState(client, source.slot);
  if (usable === null)
    throw new Error(`replication slot "${source.slot}" vanished right after creation`);
  return { usable, created: true };
}

/**
 * The way out of a source whose server is not the history the buffer holds (SOURCE_DIVERGED,
 * SOURCE_REPLACED). What it records, in one buffer transaction:
 *
 * - `keep`: the furthest position known to be on both histories — the fork point the server's
 *   timeline history gives, else the server's WAL end (or the checkpoint), lowered to the slot's
 *   position where the slot is older: from there the slot delivers the server's history again.
 * - a gap `retracted` from keep to the checkpoint: the buffer's events in it are of a history
 *   that no longer exists; they move to cdc_retracted_events, so a consumer can undo them.
 * - a gap `source_diverged` / `source_replaced` from keep to where the slot starts, when the slot
 *   starts later (a slot created now): the server's changes in between are not delivered.
 */
async function resetDiverged(
  store: BufferStore,
  client: pg.Client,
  source: SourceConfig,
  opts: ResetOptions,
  log: Logger,
  out: (line: string) => void,
  found: {
    stored: StoredHistory;
    server: ServerHistory;
    divergence: Divergence;
    slot: SlotState | null;
    hasPublication: boolean;
  },
): Promise<ResetOutcome> {
  const { stored, server, divergence, slot } = found;
  const reason: GapReason = divergence.kind === 'replaced' ? 'source_replaced' : 'source_diverged';
  const what =
    divergence.kind === 'replaced'
      ? `the server is another ${divergence.why === 'database' ? 'database' : 'cluster'} than the buffer's events came from`
      : `the server's history left the buffer's at ${formatLsn(divergence.forkLsn)}${divergence.forkKnown ? ' (its timeline history says so)' : ' or before'}`;
  const slotLsn = slot !== null && !isInvalidated(slot) ? (slot.confirmedFlushLsn ?? null) : null;
  let keep = divergence.forkLsn;
  if (slotLsn !== null && slotLsn < keep) keep = slotLsn;
  const checkpoint = formatLsn(stored.checkpointLsn);
  if (!opts.acceptGap) {
    out(
      `source "${source.id}": ${what}. The buffer's events from ${formatLsn(keep)} to its checkpoint ${checkpoint} will be retracted (moved to cdc_retracted_events, the range recorded in cdc_gaps as retracted)${slotLsn !== null && slotLsn <= keep ? `, and capture resumes at ${formatLsn(slotLsn)}, where slot "${source.slot}" delivers the server's history again` : `, a new slot is created, and the server's changes between ${formatLsn(keep)} and its start will be recorded as lost`}. Nothing was changed: re-run with --accept-gap to do it.`,
    );
    return { exitCode: EXIT_USAGE, gap: null, retraction: null, snapshotId: null };
  }
  const { usable, created } = await deliverableSlot(
    client,
    source,
    log,
    slot,
    found.hasPublication,
  );
  const start = usable.confirmedFlushLsn ?? server.walLsn;
  // A slot older than the fork delivers the shared history from its position again.
  if (start < keep) keep = start;
  const shared = {
    server: where(source),
    why: divergence.why,
    forkLsn: formatLsn(divergence.forkLsn),
    forkKnown: divergence.forkKnown,
    checkpointLsn: checkpoint,
    confirmedLsn: formatLsn(stored.confirmedLsn),
    serverWalLsn: formatLsn(server.walLsn),
    bufferIdentity: stored.identity,
    serverIdentity: server.identity,
    slotConfirmedFlushLsn: slotLsn === null ? null : formatLsn(slotLsn),
    slotCreated: created,
  };
  const gaps: GapRecord[] = [];
  if (stored.checkpointLsn > keep)
    gaps.push({
      fromLsn: formatLsn(keep),
      toLsn: checkpoint,
      reason: 'retracted',
      details: { ...shared, gapBytes: Number(stored.checkpointLsn - keep) },
      retract: true,
    });
  // A replaced server's changes before its slot are never in the buffer, whatever the positions.
  if (start > keep || divergence.kind === 'replaced')
    gaps.push({
      fromLsn: formatLsn(keep),
      toLsn: formatLsn(start),
      reason,
      details: { ...shared, gapBytes: Number(start - keep) },
    });
  const recorded = await store.recordGap({
    sourceId: source.id,
    slot: source.slot,
    checkpointLsn: checkpoint,
    gaps,
    resumeLsn: formatLsn(start),
    identity: server.identity,
    snapshot: opts.snapshot ?? null,
  });
  const ids = new Map(gaps.map((g, i) => [g.reason, recorded.gapIds[i]!]));
  const retractedId = ids.get('retracted') ?? null;
  const lostId = ids.get(reason) ?? null;
  log.warn(
    {
      reason,
      retractedGapId: retractedId,
      lostGapId: lostId,
      keepLsn: formatLsn(keep),
      resumeLsn: formatLsn(start),
      retractedEvents: recorded.retractedEvents,
      rewoundConsumers: recorded.rewoundConsumers,
      snapshot: recorded.snapshotId,
      ...shared,
    },
    'diverged source reset: events of the lost history retracted, gaps recorded in cdc_gaps',
  );
  const retracted =
    retractedId === null
      ? 'No event of the buffer lies past it.'
      : `Retracted ${recorded.retractedEvents} event(s) from ${formatLsn(keep)} to ${checkpoint} (gap #${retractedId}, reason retracted; the events are in cdc_retracted_events).${recorded.rewoundConsumers.length === 0 ? '' : ` Consumer(s) ${recorded.rewoundConsumers.join(', ')} had taken some of them: each undoes them (philotes_read_retracted) before it reads on from ${formatLsn(keep)}.`}`;
  const lost =
    lostId === null
      ? `Nothing was lost: slot "${source.slot}" delivers the server's history from ${formatLsn(start)}.`
      : `Recorded gap #${lostId} (${reason}): the server's changes between ${formatLsn(keep)} and ${formatLsn(start)} (${formatBytes(start - keep)} of WAL) are not in cdc_events${divergence.kind === 'replaced' ? ', nor any the new server committed before its slot existed' : ''}.`;
  out(
    `source "${source.id}": ${what}. ${retracted} ${lost} The checkpoint is now ${formatLsn(start)}: start Philotes and capture resumes there${recorded.snapshotId === null ? '' : `, with snapshot #${recorded.snapshotId} of every published table`}.`,
  );
  return {
    exitCode: EXIT_OK,
    gap:
      lostId === null
        ? null
        : { id: lostId, reason, fromLsn: formatLsn(keep), toLsn: formatLsn(start) },
    retraction:
      retractedId === null
        ? null
        : {
            id: retractedId,
            fromLsn: formatLsn(keep),
            toLsn: checkpoint,
            events: recorded.retractedEvents,
          },
    snapshotId: recorded.snapshotId,
  };
}
