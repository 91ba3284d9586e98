/**
 * Work on the source over an ordinary (non-replication) connection at start: preflight checks,
 * the publication and the slot, compared with what the buffer holds. The catalog lookups the
 * stream does not carry: catalog-resolver.ts.
 */
import type pg from 'pg';
import { supports } from '../src/common/server-features.js';
import type { SourceConfig } from '../src/common/config.js';
import {
  DDL_TRIGGER_VERSION,
  ddlTriggerCurrent,
  installDdlTrigger,
  readDdlTriggerState,
} from '../src/common/ddl-capture.js';
import { policyOf } from '../src/common/error-policy.js';
import { FatalSourceError } from '../src/common/errors.js';
import type { Logger } from '../src/common/logger.js';
import { formatLsn, parseLsn } from '../src/common/lsn.js';
import {
  createSlot,
  currentWalLsn,
  pgoutputProtocol,
  publicationExists,
  publicationMissingError,
  readSlotState,
  slotVerdict,
  where,
  workerCommand,
  type SlotState,
} from '../src/common/source-admin.js';
import {
  confirmedOnHistory,
  divergenceError,
  findDivergence,
  readServerHistory,
  storedHistory,
  type ServerHistory,
  type SourceIdentity,
  type StoredHistory,
} from '../src/common/source-history.js';
import { createPublication } from '../src/common/publication.js';

export interface PreparedSource {
  readonly serverVersion: number;
  /** The server's identity now: recorded with the start, compared at every later start. */
  readonly identity: SourceIdentity;
  /** DDL that may have gone uncaptured before this start (recorded with the start). */
  readonly ddlGap: DdlGap | null;
  /** The server's next 64-bit xid now: the reference that makes the stream's xids 64-bit. */
  readonly nextXid: bigint;
  /** pgoutput's protocol version for this server: 2 streams in-progress transactions. */
  readonly protocol: 1 | 2;
  readonly slotCreated: boolean;
  readonly publicationCreated: boolean;
  /** Where streaming starts: the buffer's checkpoint, or where a slot new to the buffer starts. */
  readonly startLsn: bigint;
  /** The furthest position Philotes may confirm to the slot without recording it first. */
  readonly recordedLsn: bigint;
  /**
   * recordedLsn is not in the buffer yet (a source new to the buffer, or one written by an
   * earlier version): record it before streaming, so the buffer always knows where this slot's
   * capture stands.
   */
  readonly mustRecord: boolean;
}

/**
 * Preflight checks, then the publication and the slot. With a checkpoint in the buffer, nothing
 * is created that would hide a gap: a missing slot or publication, an invalidated slot, or a
 * slot another client has advanced stops the source with the gap and the way out.
 */
export async function prepareSource(
  client: pg.Client,
  /** The source's connection options, for the replication commands that identify the server. */
  options: pg.ClientConfig,
  source: SourceConfig,
  log: Logger,
  record: BufferRecord | null,
): Promise<PreparedSource> {
  const settings = await client.query<{ wal_level: string; version: string }>(
    `SELECT current_setting('wal_level') AS wal_level, current_setting('server_version_num') AS version`,
  );
  const row = settings.rows[0];
  if (!row) throw new Error('could not read server settings');
  if (row.wal_level !== 'logical') {
    throw new FatalSourceError(
      `wal_level is "${row.wal_level}" on ${where(source)}; logical replication needs wal_level = logical (fix: ${policyOf('WAL_LEVEL_NOT_LOGICAL').fix(source)})`,
      'WAL_LEVEL_NOT_LOGICAL',
    );
  }
  const serverVersion = Number(row.version);
  if (!supports(serverVersion, 'pgoutput')) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} has no pgoutput; version 10 or later is needed`,
      'SERVER_TOO_OLD',
    );
  }
  if (source.messages.length > 0 && !supports(serverVersion, 'logicalMessages')) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} cannot send logical messages to pgoutput (version 14 or later); remove messages from this source's configuration`,
      'SERVER_TOO_OLD',
    );
  }

  if (source.failover && !supports(serverVersion, 'failoverSlots')) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} has no failover slots (version 17 or later); set failover: false for this source, or use logical replication slots on a standby another way`,
      'SERVER_TOO_OLD',
    );
  }
  const protocol = pgoutputProtocol(source, serverVersion);
  if (protocol === null) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} has no pgoutput protocol 2 (version 14 or later); set protocol: 1 or auto for this source`,
      'SERVER_TOO_OLD',
    );
  }
  const ddlGap = source.ddl
    ? await prepareDdlCapture(client, source, serverVersion, log, record)
    : null;

  // Amazon RDS grants replication through membership of rds_replication, not the attribute.
  const role = await client.query<{ ok: boolean; name: string }>(
    `SELECT (r.rolsuper OR r.rolreplication OR EXISTS (
              SELECT 1 FROM pg_roles g
               WHERE g.rolname = 'rds_replication' AND pg_has_role(current_user, g.oid, 'member'))) AS ok,
            r.rolname AS name
       FROM pg_roles r WHERE r.rolname = current_user`,
  );
  if (role.rows[0] && !role.rows[0].ok) {
    throw new FatalSourceError(
      `user "${role.rows[0].name}" on ${where(source)} cannot use replication slot "${source.slot}": it needs the REPLICATION attribute (fix: ${policyOf('NO_REPLICATION_ATTRIBUTE').fix(source)})`,
      'NO_REPLICATION_ATTRIBUTE',
    );
  }

  // The server first: on another history (or another server), nothing else it says about the
  // publication or the slot means what it would on ours.
  const server = await readServerHistory(client, options, record?.identity?.timeline ?? null);
  const stored = record === null ? null : checkHistory(source, log, record, server);

  let publicationCreated = false;
  if (await publicationExists(client, source.publication)) {
    log.info({ publication: source.publication }, 'publication exists');
  } else if (record !== null) {
    throw publicationMissingError(
      source,
      `does not exist on ${where(source)}, but the buffer holds this source's changes up to ${formatLsn(record.checkpointLsn)}: it was dropped (or the configured name changed) after that point`,
      null,
    );
  } else {
    publicationCreated = await createPublication(client, source, log);
  }

  const slot =
    record !== null && stored !== null
      ? await checkSlot(client, source, log, record, stored, server)
      : await newCapture(client, source, log, publicationCreated);
  return {
    serverVersion,
    identity: server.identity,
    nextXid: server.nextXid,
    ddlGap,
    protocol,
    publicationCreated,
    ...slot,
  };
}

/**
 * `ddl: true`: the event trigger that writes DDL into the stream must be in place, current, and
 * firing before streaming starts. Philotes installs or upgrades it when its role may; otherwise
 * the source stops with the SQL a superuser runs once.
 */
async function prepareDdlCapture(
  client: pg.Client,
  source: SourceConfig,
  serverVersion: number,
  log: Logger,
  record: BufferRecord | null,
): Promise<DdlGap | null> {
  if (!supports(serverVersion, 'logicalMessages')) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} cannot send logical messages to pgoutput (version 14 or later), which DDL capture needs; set ddl: false for this source`,
      'SERVER_TOO_OLD',
    );
  }
  const state = await readDdlTriggerState(client);
  if (ddlTriggerCurrent(state)) {
    log.info({ version: state.version }, 'DDL capture trigger is installed');
    return ddlGapSince(record, state.restartedAt, null, log);
  }
  if (!state.canInstall) {
    const what =
      state.version === null
        ? 'is not installed'
        : state.triggersEnabled
          ? `is version ${state.version}, older than this Philotes' ${DDL_TRIGGER_VERSION}`
          : 'has a disabled or missing event trigger';
    throw new FatalSourceError(
      `DDL capture on ${where(source)} ${what}, and the role cannot install it (event triggers need a superuser): run \`${workerCommand(source, 'ddl-trigger', `--source ${source.id} --print`)} | psql <superuser connection>\` once, or set ddl: false`,
      'DDL_TRIGGER_MISSING',
    );
  }
  await installDdlTrigger(client);
  log.info(
    { previousVersion: state.version, version: DDL_TRIGGER_VERSION },
    state.version === null
      ? 'installed the DDL capture trigger'
      : 'upgraded the DDL capture trigger',
  );
  const installed = await readDdlTriggerState(client);
  return ddlGapSince(record, installed.restartedAt, await currentWalLsn(client), log);
}

/** DDL that may have gone uncaptured: from the buffer's checkpoint to where capture restarted. */
export interface DdlGap {
  readonly fromLsn: bigint;
  readonly toLsn: bigint;
}

/**
 * A capture that replaced a missing or disabled one, restarted past the buffer's checkpoint:
 * DDL in between may be missing (the trigger was dropped or disabled while Philotes was down).
 * `installedNow`: the WAL position after this start's own install committed (DDL in
 * transactions concurrent with it may have missed the trigger too).
 */
function ddlGapSince(
  record: BufferRecord | null,
  restartedAt: string | null,
  installedNow: bigint | null,
  log: Logger,
): DdlGap | null {
  if (record === null || restartedAt === null) return null;
  let toLsn = parseLsn(restartedAt);
  if (installedNow !== null && installedNow > toLsn) toLsn = installedNow;
  if (toLsn <= record.checkpointLsn) return null;
  log.warn(
    { fromLsn: formatLsn(record.checkpointLsn), toLsn: formatLsn(toLsn) },
    "DDL capture was missing or disabled after the buffer's checkpoint and has been put back: DDL from the checkpoint to its restart may be missing; recorded in cdc_gaps (reason ddl_not_captured)",
  );
  return { fromLsn: record.checkpointLsn, toLsn };
}

/** Stops a source whose server is not the history the buffer holds (see source-history.ts). */
function checkHistory(
  source: SourceConfig,
  log: Logger,
  record: BufferRecord,
  server: ServerHistory,
): StoredHistory {
  const stored = storedHistory(record);
  const divergence = findDivergence(stored, server);
  if (divergence !== null) throw divergenceError(source, divergence, stored, server);
  if (record.identity === null)
    log.info(
      { identity: server.identity },
      "the buffer has no record of this source's server identity yet: recording it now",
    );
  return stored;
}

/** What the buffer holds for a source: its checkpoint, confirmations and history. */
export interface BufferRecord {
  readonly checkpointLsn: bigint;
  /** Null: written by a version that did not record confirmations. */
  readonly confirmedLsn: bigint | null;
  readonly checkpointXid: number | null;
  readonly identity: SourceIdentity | null;
}

/**
 * A source the buffer has a checkpoint for: the server must be the history the buffer holds, and
 * the slot must deliver everything after the checkpoint.
 */
async function checkSlot(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
  record: BufferRecord,
  stored: StoredHistory,
  server: ServerHistory,
): Promise<{ slotCreated: false; startLsn: bigint; recordedLsn: bigint; mustRecord: boolean }> {
  const slot = await readSlotState(client, source.slot);
  let confirmedLsn = record.confirmedLsn === null ? null : confirmedOnHistory(stored, server);
  const mustRecord = confirmedLsn === null;
  if (confirmedLsn === null) {
    // A buffer written before Philotes recorded its confirmations: its idle confirmations may
    // have moved the slot past the checkpoint, and nothing tells them apart from another
    // client's. Trust the slot this once; from now on every confirmation is recorded first.
    const slotLsn = slot?.confirmedFlushLsn ?? null;
    confirmedLsn =
      slotLsn !== null && slotLsn > record.checkpointLsn ? slotLsn : record.checkpointLsn;
    log.warn(
      {
        checkpoint: formatLsn(record.checkpointLsn),
        slotConfirmedFlushLsn: formatLsn(confirmedLsn),
      },
      'the buffer holds no record of the positions an earlier Philotes confirmed to this slot; taking the slot position as ours this once',
    );
  }
  const durable = { checkpointLsn: record.checkpointLsn, confirmedLsn };
  const problem = slotVerdict(source, slot, await currentWalLsn(client), durable);
  if (problem !== null) throw problem.error;
  warnAboutSlot(slot!, log, source);
  log.info(
    {
      confirmedFlushLsn:
        slot!.confirmedFlushLsn === null ? null : formatLsn(slot!.confirmedFlushLsn),
    },
    'replication slot exists and can deliver every change after the checkpoint',
  );
  const recordedLsn = confirmedLsn > record.checkpointLsn ? confirmedLsn : record.checkpointLsn;
  return { slotCreated: false, startLsn: record.checkpointLsn, recordedLsn, mustRecord };
}

/** A source new to the buffer: use the slot if there is one, else create it. */
async function newCapture(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
  publicationCreated: boolean,
): Promise<{ slotCreated: boolean; startLsn: bigint; recordedLsn: bigint; mustRecord: true }> {
  let slot = await readSlotState(client, source.slot);
  let slotCreated = false;
  if (slot === null) {
    slotCreated = await createSlot(client, source);
    if (slotCreated) log.info('replication slot created');
    slot = await readSlotState(client, source.slot);
    if (slot === null)
      throw new Error(`replication slot "${source.slot}" vanished right after creation`);
  } else {
    log.info(
      {
        confirmedFlushLsn:
          slot.confirmedFlushLsn === null ? null : formatLsn(slot.confirmedFlushLsn),
      },
      'replication slot exists; the buffer has no checkpoint for this source yet, so capture starts where the slot is',
    );
  }
  const problem = slotVerdict(source, slot, 0n, null);
  if (problem !== null) throw problem.error;
  warnAboutSlot(slot, log, source);
  let startLsn = slot.confirmedFlushLsn ?? 0n;
  if (publicationCreated && !slotCreated) {
    // The slot is older than the publication just created: changes between the two cannot be
    // decoded with it (the publication did not exist then). Nothing is promised for a source
    // new to the buffer, so capture starts after the publication.
    const now = await currentWalLsn(client);
    if (now > startLsn) {
      log.info(
        { slotConfirmedFlushLsn: formatLsn(startLsn), startLsn: formatLsn(now) },
        'the slot is older than the publication just created: capture starts after the publication',
      );
      startLsn = now;
    }
  }
  return { slotCreated, startLsn, recordedLsn: startLsn, mustRecord: true };
}

/** A slot about to lose WAL it still needs, or one a standby will not keep, is worth a loud line. */
function warnAboutSlot(slot: SlotState, log: Logger, source?: SourceConfig): void {
  if (source?.failover === true && slot.failover === false) {
    log.warn(
      { failover: false },
      `failover: true, but the slot was created without FAILOVER: a standby does not keep it, and a promotion loses it. Mark it: ALTER_REPLICATION_SLOT ${source.slot} (FAILOVER true) on a replication connection (psql "dbname=… replication=database")`,
    );
  }
  if (slot.walStatus === 'unreserved') {
    log.warn(
      { walStatus: slot.walStatus },
      'the replication slot is about to lose WAL it has not delivered yet (wal_status unreserved, beyond max_slot_wal_keep_size): if it is invalidated, changes are lost and the source stops',
    );
  }
}
