/**
 * Source-side administration over an ordinary (non-replication) connection, shared by the reader
 * thread and the operator's `reset-source` command: the publication, the slot and its state, and
 * the continuity rule — whether the slot can still deliver every change after the buffer's
 * checkpoint. A leaf module: it imports only other leaf modules.
 *
 * Why the rule is needed: the server starts a stream at max(requested LSN, the slot's
 * confirmed_flush_lsn) and silently skips what lies between, and a slot dropped and created again
 * starts at "now". Either is a silent gap unless the client compares the slot with its own
 * durable record before streaming.
 */
import { policyOf } from './error-policy.js';
import { resetCommand, where } from './source-names.js';
import type pg from 'pg';
import { supports } from './server-features.js';
import type { SlotDecodingStats } from './protocol.js';
import type { SourceConfig } from './config.js';
import { FatalSourceError, type FatalCode } from './errors.js';
import { formatBytes, formatLsn, parseLsn } from './lsn.js';

export { resetCommand, where, workerCommand } from './source-names.js';

export interface SlotState {
  readonly plugin: string | null;
  readonly slotType: string;
  readonly database: string | null;
  readonly active: boolean;
  readonly activePid: number | null;
  /** reserved, extended, unreserved, lost (PostgreSQL 13+); null before. */
  readonly walStatus: string | null;
  /** Why the slot was invalidated (PostgreSQL 17+: wal_removed, rows_removed, ...), if it was. */
  readonly invalidationReason: string | null;
  readonly confirmedFlushLsn: bigint | null;
  readonly restartLsn: bigint | null;
  /** Bytes of WAL it may still hold before max_slot_wal_keep_size invalidates it (13+; null: no limit). */
  readonly safeWalSize: number | null;
  /** Created with FAILOVER: a standby with sync_replication_slots keeps it (17+; null before). */
  readonly failover: boolean | null;
  /** On a standby: a copy kept in sync from the primary's failover slot (17+; null before). */
  readonly synced: boolean | null;
}

/** The slot as pg_replication_slots shows it now, or null if there is no such slot. */
export async function readSlotState(client: pg.Client, slot: string): Promise<SlotState | null> {
  // to_jsonb: the view gains columns from version to version (conflicting in 16,
  // invalidation_reason in 17); read the ones this server has.
  const result = await client.query<{ s: Record<string, unknown> }>(
    'SELECT to_jsonb(s) AS s FROM pg_replication_slots s WHERE slot_name = $1',
    [slot],
  );
  const s = result.rows[0]?.s;
  if (!s) return null;
  const text = (key: string): string | null => (typeof s[key] === 'string' ? s[key] : null);
  const lsn = (key: string): bigint | null => {
    const v = text(key);
    return v === null ? null : parseLsn(v);
  };
  const conflicting = s['conflicting'] === true;
  return {
    plugin: text('plugin'),
    slotType: text('slot_type') ?? 'unknown',
    database: text('database'),
    active: s['active'] === true,
    activePid: typeof s['active_pid'] === 'number' ? s['active_pid'] : null,
    walStatus: text('wal_status'),
    invalidationReason: text('invalidation_reason') ?? (conflicting ? 'conflict' : null),
    confirmedFlushLsn: lsn('confirmed_flush_lsn'),
    restartLsn: lsn('restart_lsn'),
    safeWalSize: typeof s['safe_wal_size'] === 'number' ? s['safe_wal_size'] : null,
    failover: typeof s['failover'] === 'boolean' ? s['failover'] : null,
    synced: typeof s['synced'] === 'boolean' ? s['synced'] : null,
  };
}

/**
 * What the server's decoding did for the slot since its statistics were last reset (PostgreSQL
 * 14+, pg_stat_replication_slots): transactions spilled to its disk because they outgrew
 * logical_decoding_work_mem, and transactions streamed while in progress instead.
 */
export async function readSlotDecodingStats(
  client: pg.Client,
  slot: string,
): Promise<SlotDecodingStats | null> {
  const result = await client.query<Record<keyof SlotDecodingStats, string>>(
    `SELECT spill_txns AS "spillTxns", spill_bytes AS "spillBytes",
            stream_txns AS "streamTxns", stream_bytes AS "streamBytes"
       FROM pg_stat_replication_slots WHERE slot_name = $1`,
    [slot],
  );
  const row = result.rows[0];
  if (!row) return null;
  return {
    spillTxns: Number(row.spillTxns),
    spillBytes: Number(row.spillBytes),
    streamTxns: Number(row.streamTxns),
    streamBytes: Number(row.streamBytes),
  };
}

/**
 * The pgoutput protocol a source uses on a server: the configured one, or 2 (streaming of
 * in-progress transactions, PostgreSQL 14+) where the server has it. Null: 2 is configured and
 * the server lacks it.
 */
export function pgoutputProtocol(source: SourceConfig, serverVersion: number): 1 | 2 | null {
  const streams = supports(serverVersion, 'streamingProtocol');
  if (source.protocol === 2 && !streams) return null;
  return source.protocol ?? (streams ? 2 : 1);
}

/** The WAL the source keeps for the slot: its WAL position minus the slot's restart_lsn. */
export function retainedWalBytes(slot: SlotState, currentWal: bigint): number | null {
  return slot.restartLsn === null ? null : Math.max(0, Number(currentWal - slot.restartLsn));
}

/** Who streams the slot: the application name and address of the walsender's client. */
export async function slotHolder(
  client: pg.Client,
  pid: number,
): Promise<{ applicationName: string; address: string | null }> {
  const who = await client.query<{ application_name: string; client_addr: string | null }>(
    'SELECT application_name, client_addr::text FROM pg_stat_replication WHERE pid = $1',
    [pid],
  );
  const row = who.rows[0];
  return { applicationName: row?.application_name ?? '', address: row?.client_addr ?? null };
}

/** What taking the slot over from a walsender that still streams it came to. */
export interface SlotTakeover {
  readonly pid: number;
  readonly applicationName: string;
  /** The walsender is gone and the slot free; false: why not (the stream start then fails). */
  readonly freed: boolean;
  readonly why: string | null;
}

/** How long a terminated walsender may take to let go of the slot. */
const TAKEOVER_WAIT_MS = 5_000;

/**
 * For a reader that holds the source's lease (the fence keeps any earlier owner from storing):
 * a walsender of an earlier Philotes run that still streams the slot — a process killed or
 * frozen whose TCP connection the server has not yet seen die — is terminated, so that the
 * stream starts now rather than after `wal_sender_timeout`. Only a walsender whose client names
 * itself Philotes (application_name `philotes:…`) is touched: another client streaming the slot
 * is an operator's mistake, reported as it was. Needs the same role as that walsender or
 * pg_signal_backend; without it, the slot is freed when the server times the walsender out.
 */
export async function takeOverSlot(client: pg.Client, slot: string): Promise<SlotTakeover | null> {
  const state = await readSlotState(client, slot);
  if (state?.activePid == null) return null;
  const pid = state.activePid;
  const { applicationName } = await slotHolder(client, pid);
  if (!applicationName.startsWith('philotes:'))
    return {
      pid,
      applicationName,
      freed: false,
      why: applicationName
        ? `it is streamed by another client (${applicationName})`
        : 'it is streamed by a client this role cannot see (pg_read_all_stats shows it)',
    };
  try {
    const result = await client.query<{ ok: boolean }>('SELECT pg_terminate_backend($1) AS ok', [
      pid,
    ]);
    if (result.rows[0]?.ok !== true)
      return { pid, applicationName, freed: false, why: 'the walsender could not be signalled' };
  } catch (error) {
    const e = error as { code?: unknown; message?: unknown };
    return {
      pid,
      applicationName,
      freed: false,
      why:
        e.code === '42501'
          ? 'this role may not terminate it (it needs the same role or pg_signal_backend)'
          : String(e.message),
    };
  }
  for (const deadline = Date.now() + TAKEOVER_WAIT_MS; Date.now() < deadline;) {
    const now = await readSlotState(client, slot);
    if (now?.activePid !== pid) return { pid, applicationName, freed: true, why: null };
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return { pid, applicationName, freed: false, why: 'it did not exit within 5 s' };
}

export function isInvalidated(slot: SlotState): boolean {
  return slot.walStatus === 'lost' || slot.invalidationReason !== null;
}

/** The source's WAL position now (its replay position on a standby). */
export async function currentWalLsn(client: pg.Client): Promise<bigint> {
  const result = await client.query<{ lsn: string }>(
    `SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                  ELSE pg_current_wal_lsn() END)::text AS lsn`,
  );
  return parseLsn(result.rows[0]!.lsn);
}

/** Creates the slot; false if it was created concurrently (read it back either way). */
export async function createSlot(client: pg.Client, source: SourceConfig): Promise<boolean> {
  try {
    // Waits for transactions running now to finish: a consistent starting point. failover
    // (17+; the start checks the version first): temporary and two-phase stay off.
    await client.query(
      source.failover
        ? `SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)`
        : `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`,
      [source.slot],
    );
    return true;
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === '42501') {
      throw new FatalSourceError(
        `cannot create replication slot "${source.slot}" on ${where(source)}: the user needs the REPLICATION attribute (fix: ${policyOf('NO_REPLICATION_ATTRIBUTE').fix(source)})`,
        'NO_REPLICATION_ATTRIBUTE',
      );
    }
    if (code === '53400') {
      throw new FatalSourceError(
        `cannot create replication slot "${source.slot}" on ${where(source)}: all replication slots are in use (fix: ${policyOf('NO_FREE_SLOT').fix(source)})`,
        'NO_FREE_SLOT',
      );
    }
    if (code === '42710') return false; // created concurrently
    throw error;
  }
}

/** Why the slot is not one Philotes can read for this source, if it is not. */
function wrongSlot(source: SourceConfig, slot: SlotState): SlotProblem | null {
  if (slot.slotType !== 'logical' || slot.plugin !== 'pgoutput') {
    const what = `replication slot "${source.slot}" on ${where(source)} is a ${slot.slotType} slot with plugin ${slot.plugin ?? 'none'}`;
    return {
      what,
      error: new FatalSourceError(
        `${what}; Philotes needs a logical pgoutput slot (fix: ${policyOf('SLOT_WRONG_KIND').fix(source)})`,
        'SLOT_WRONG_KIND',
      ),
    };
  }
  if (slot.database !== source.connection.database) {
    const what = `replication slot "${source.slot}" belongs to database "${slot.database}", not "${source.connection.database}"`;
    const fix = policyOf('SLOT_WRONG_DATABASE').fix(source);
    return { what, error: new FatalSourceError(`${what} (fix: ${fix})`, 'SLOT_WRONG_DATABASE') };
  }
  return null;
}

/** Fails plainly if the slot is not one Philotes can read for this source. */
export function checkSlotKind(source: SourceConfig, slot: SlotState): void {
  const wrong = wrongSlot(source, slot);
  if (wrong !== null) throw wrong.error;
}

// ---- continuity ----

/** What the buffer knows about a source's progress. */
export interface DurableRecord {
  /** End of the last stored transaction's commit: everything before it is in the buffer. */
  readonly checkpointLsn: bigint;
  /**
   * The furthest position Philotes may have confirmed to the slot, recorded in the buffer before
   * it was confirmed (idle confirmations pass the checkpoint). Never behind the checkpoint.
   */
  readonly confirmedLsn: bigint;
}

export type GapReason =
  | 'slot_missing'
  | 'slot_invalidated'
  | 'slot_advanced'
  | 'publication_missing'
  | 'skip_to_current'
  | 'source_diverged'
  | 'source_replaced';

/** What findGap can see from the slot alone. */
export type SlotGapReason = 'slot_missing' | 'slot_invalidated' | 'slot_advanced';

export interface Gap {
  readonly reason: SlotGapReason;
  /** Everything up to here is in the buffer. */
  readonly fromLsn: bigint;
  /** The slot can deliver from here on (for a missing or lost slot: the source's WAL now). */
  readonly toLsn: bigint;
}

/**
 * Whether the slot can deliver every change after what the buffer holds. Anything past
 * `record.confirmedLsn` that the slot has already confirmed was confirmed by someone else.
 */
export function findGap(
  record: DurableRecord,
  slot: SlotState | null,
  currentWal: bigint,
): Gap | null {
  const fromLsn =
    record.confirmedLsn > record.checkpointLsn ? record.confirmedLsn : record.checkpointLsn;
  if (slot === null) return { reason: 'slot_missing', fromLsn, toLsn: currentWal };
  if (isInvalidated(slot)) {
    return { reason: 'slot_invalidated', fromLsn, toLsn: currentWal };
  }
  if (slot.confirmedFlushLsn !== null && slot.confirmedFlushLsn > fromLsn) {
    return { reason: 'slot_advanced', fromLsn, toLsn: slot.confirmedFlushLsn };
  }
  return null;
}

/** The fatal error for a gap: what happened, the positions, the size, and the way out. */
export function gapError(
  source: SourceConfig,
  gap: Gap,
  slot: SlotState | null,
  checkpointLsn: bigint,
): FatalSourceError {
  return gapProblem(source, gap, slot, checkpointLsn).error;
}

/** A gap as a slot problem: its error, and what happened without the way out. */
function gapProblem(
  source: SourceConfig,
  gap: Gap,
  slot: SlotState | null,
  checkpointLsn: bigint,
): SlotProblem {
  const from = formatLsn(gap.fromLsn);
  const to = formatLsn(gap.toLsn);
  const size = formatBytes(gap.toLsn - gap.fromLsn);
  // The caller prefixes the source ("philotes: source "orders": ...").
  const head = 'stopped to avoid a silent gap:';
  const explained: Record<SlotGapReason, { code: FatalCode; what: string }> = {
    slot_missing: {
      code: 'SLOT_MISSING',
      what: `replication slot "${source.slot}" does not exist on ${where(source)}, but the buffer holds this source's changes up to ${from}; changes committed since then (${from} to ${to} now, ${size} of WAL) can no longer be delivered (was the slot dropped?). Philotes never creates a new slot under an existing checkpoint.`,
    },
    slot_invalidated: {
      code: 'SLOT_INVALIDATED',
      what: `replication slot "${source.slot}" on ${where(source)} has been invalidated (${slot?.invalidationReason ?? `wal_status ${slot?.walStatus ?? 'lost'}`}): the WAL after the buffer's checkpoint ${from} was removed before Philotes read it, so changes from ${from} to ${to} (${size} of WAL) are lost. max_slot_wal_keep_size limits what a slot may retain.`,
    },
    slot_advanced: {
      code: 'SLOT_ADVANCED',
      what: `replication slot "${source.slot}" on ${where(source)} was advanced by another client to ${to}, past the buffer's checkpoint ${formatLsn(checkpointLsn)} and past anything Philotes confirmed (${from}); the server will not send the changes between ${from} and ${to} (${size} of WAL) again. (Other causes of the same: the slot was dropped and created again, or the buffer was restored from an older backup.) Make sure nothing else reads this slot.`,
    },
  };
  const { code, what } = explained[gap.reason];
  const error = new FatalSourceError(
    `${head} ${what} To record the gap in the buffer (cdc_gaps) and resume at ${gap.reason === 'slot_advanced' ? to : 'a new slot'}: ${policyOf(code).fix(source)}`,
    code,
    {
      gapFromLsn: from,
      gapToLsn: to,
      gapBytes: Number(gap.toLsn - gap.fromLsn),
      slot: source.slot,
    },
  );
  return { error, what: `${head} ${what}` };
}

/** A slot that cannot serve the source: the error a start throws, and what it says happened. */
export interface SlotProblem {
  readonly error: FatalSourceError;
  /** What happened, without the way out (check prints the way out as its fix). */
  readonly what: string;
}

/**
 * The slot and continuity verdict, one pure function for everyone: the reader throws its error
 * (at the start, and again once its stream holds the slot), `check` prints it. Null: the slot can
 * serve the source — it delivers everything after what the buffer holds (`record`), or, for a
 * source new to the buffer, it is usable or missing (then a start creates it).
 */
export function slotVerdict(
  source: SourceConfig,
  slot: SlotState | null,
  currentWal: bigint,
  record: DurableRecord | null,
): SlotProblem | null {
  if (slot !== null) {
    const wrong = wrongSlot(source, slot);
    if (wrong !== null) return wrong;
  }
  if (record === null) {
    if (slot === null || !isInvalidated(slot)) return null;
    const what = `replication slot "${source.slot}" on ${where(source)} has been invalidated (${slot.invalidationReason ?? 'wal_status lost'}) and cannot be read`;
    return {
      what,
      error: new FatalSourceError(
        `${what}; the buffer has no checkpoint for this source, so nothing stored is at stake: drop the slot (SELECT pg_drop_replication_slot('${source.slot}')) and start again`,
        'SLOT_INVALIDATED',
      ),
    };
  }
  const gap = findGap(record, slot, currentWal);
  return gap === null ? null : gapProblem(source, gap, slot, record.checkpointLsn);
}

// ---- publication ----

/**
 * Published tables a snapshot cannot copy: no primary key and no unique index on NOT NULL plain
 * columns to read chunks by (see workers/snapshot/runner.ts, chunkKey).
 */
export async function tablesWithoutChunkKey(
  client: pg.Client,
  publication: string,
): Promise<string[]> {
  const result = await client.query<{ name: string }>(
    `SELECT format('%I.%I', pt.schemaname, pt.tablename) AS name
       FROM pg_publication_tables pt
       JOIN pg_namespace n ON n.nspname = pt.schemaname
       JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
      WHERE pt.pubname = $1
        AND NOT EXISTS (
              SELECT 1 FROM pg_index i
               WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indimmediate
                 AND i.indpred IS NULL AND i.indexprs IS NULL
                 AND NOT EXISTS (
                       SELECT 1 FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                        WHERE k.ord <= i.indnkeyatts AND (NOT a.attnotnull OR a.attgenerated <> '')))
      ORDER BY 1`,
    [publication],
  );
  return result.rows.map((r) => r.name);
}

/** Whether the publication exists now. */
export async function publicationExists(client: pg.Client, publication: string): Promise<boolean> {
  const existing = await client.query('SELECT 1 FROM pg_publication WHERE pubname = $1', [
    publication,
  ]);
  return (existing.rowCount ?? 0) > 0;
}

/**
 * The error for a publication the slot cannot decode with: decoding uses the catalog as it was
 * at each point of the WAL, so a publication dropped (or first created) after the checkpoint does
 * not exist for the changes in between, even once it exists again today. The only way past those
 * changes is to skip them, which is a gap the operator must accept.
 */
export function publicationMissingError(
  source: SourceConfig,
  detail: string,
  atLsn: string | null,
): FatalSourceError {
  return new FatalSourceError(
    `stopped: publication "${source.publication}" ${detail}. Decoding reads the catalog as it was at each point of the WAL, so creating the publication again does not make the changes committed while it was missing decodable: they cannot be delivered. To create the publication if needed, skip the slot to the source's current position and record the gap in the buffer (cdc_gaps): ${resetCommand(source, ' --skip-to-current')}`,
    'PUBLICATION_MISSING',
    { publication: source.publication, slot: source.slot, atLsn },
  );
}
