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
import type { Config, SourceConfig } from './common/config.js';
import { pgClientOptions } from './common/pg-connection.js';
import { BufferStore } from './buffer/store.js';
import { unknownSource } from './cli-output.js';
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE } from './exit.js';
import type { Logger } from './common/logger.js';
import { formatBytes, formatLsn, parseLsn } from './common/lsn.js';
import {
  checkSlotKind,
  createPublication,
  createSlot,
  currentWalLsn,
  findGap,
  isInvalidated,
  publicationExists,
  readSlotState,
  where,
  type GapReason,
  type SlotState,
} from './common/source-admin.js';

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

/** What a reset did: the gap it recorded (and the snapshot it began), if any. */
export interface ResetOutcome {
  readonly exitCode: number;
  readonly gap: { id: number; reason: GapReason; fromLsn: string; toLsn: string } | null;
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
};

/** How long to wait for the source's lock before saying another process holds it. */
const LOCK_WAIT_MS = 10_000;

export class ResetError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

/** Runs the command; resolves with the exit code, having written its report with `out`. */
export async function resetSource(
  config: Config,
  opts: ResetOptions,
  log: Logger,
  out: (line: string) => void,
): Promise<number> {
  const source = config.sources.find((s) => s.id === opts.sourceId);
  if (!source) {
    throw new ResetError(unknownSource(config, opts.sourceId), EXIT_USAGE);
  }
  const store = await BufferStore.open(config.buffer, log, 2);
  try {
    // A worker whose source is failed takes the lock only for a moment at each slow retry:
    // wait that out; one that captures the source holds it for good.
    let lock = await store.lockSource(source.id);
    for (const deadline = Date.now() + LOCK_WAIT_MS; !lock && Date.now() < deadline;) {
      await sleep(250);
      lock = await store.lockSource(source.id);
    }
    if (!lock) {
      throw new ResetError(
        `source "${source.id}" is being captured by a running Philotes process (it holds the source's lock in the buffer); stop that process, then run reset-source again`,
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
      await lock.release();
    }
  } finally {
    await store.close();
  }
}

/**
 * The reset itself, for a caller that holds the source's lock and a connection to it: the command
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
  const unchanged = (exitCode: number): ResetOutcome => ({ exitCode, gap: null, snapshotId: null });
  const checkpoint = await store.readCheckpoint(source.id);
  const slot = await readSlotState(client, source.slot);
  if (slot !== null) checkSlotKind(source, slot);
  const hasPublication = await publicationExists(client, source.publication);
  const now = await currentWalLsn(client);

  const checkpointLsn = checkpoint === null ? null : parseLsn(checkpoint.lsn);
  const confirmedLsn =
    checkpoint?.confirmedLsn == null ? checkpointLsn : parseLsn(checkpoint.confirmedLsn);
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

  // Get the slot (and the publication) into a state that can deliver, then find where it starts.
  if (!hasPublication) await createPublication(client, source, log);
  let usable: SlotState | null = slot;
  let created = false;
  if (slot !== null && invalidated) {
    await client.query('SELECT pg_drop_replication_slot($1)', [source.slot]);
    usable = null;
  }
  if (usable === null) {
    await createSlot(client, source);
    created = true;
    usable = await readSlotState(client, source.slot);
    if (usable === null)
      throw new Error(`replication slot "${source.slot}" vanished right after creation`);
  }
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
  if (checkpointLsn !== null && toLsn < checkpointLsn) toLsn = checkpointLsn;

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
    gapBytes: Number(toLsn > fromLsn ? toLsn - fromLsn : 0n),
  };
  const recorded = await store.recordGap({
    sourceId: source.id,
    slot: source.slot,
    fromLsn: formatLsn(fromLsn),
    toLsn: formatLsn(toLsn),
    checkpointLsn: checkpoint?.lsn ?? null,
    reason,
    details,
    snapshot: opts.snapshot ?? null,
  });
  log.warn(
    {
      gapId: recorded.gapId,
      reason,
      fromLsn: formatLsn(fromLsn),
      toLsn: formatLsn(toLsn),
      snapshot: recorded.snapshotId,
      ...details,
    },
    'gap accepted and recorded in cdc_gaps',
  );
  out(
    `source "${source.id}": ${EXPLAIN[reason]}. Recorded gap #${recorded.gapId} in cdc_gaps: changes committed between ${formatLsn(fromLsn)} and ${formatLsn(toLsn)} (${formatBytes(toLsn > fromLsn ? toLsn - fromLsn : 0n)} of WAL) may be missing from cdc_events. The checkpoint is now ${formatLsn(toLsn)}: start Philotes and capture resumes there${recorded.snapshotId === null ? '' : `, with snapshot #${recorded.snapshotId} of every published table`}.`,
  );
  return {
    exitCode: EXIT_OK,
    gap: { id: recorded.gapId, reason, fromLsn: formatLsn(fromLsn), toLsn: formatLsn(toLsn) },
    snapshotId: recorded.snapshotId,
  };
}
