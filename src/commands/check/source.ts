/**
 * A source's server and role: wal_level, version and pgoutput protocol, REPLICATION; then the
 * checks that need them (history, slot, publication, DDL capture), in the order a start meets
 * them.
 */
import type pg from 'pg';
import type { SourceConfig } from '../../common/config.js';
import { ddlTriggerCurrent, readDdlTriggerState } from '../../common/ddl-capture.js';
import { fixFor } from '../../common/error-policy.js';
import { supports } from '../../common/server-features.js';
import {
  currentWalLsn,
  pgoutputProtocol,
  readSlotState,
  type SlotState,
} from '../../common/source-admin.js';
import { workerCommand } from '../../common/source-names.js';
import type { BufferRecord } from './buffer.js';
import { checkHistory, checkSlot } from './continuity.js';
import { withClient, type AddFinding, type Finding } from './finding.js';
import { checkPublication } from './publication.js';

export async function checkSource(
  source: SourceConfig,
  record: BufferRecord | null,
  bufferRead: boolean,
): Promise<Finding[]> {
  return withClient(source.id, 'source', source.connection, async (client, add) => {
    const settings = (
      await client.query<{
        wal_level: string;
        version: string;
        max_slots: string;
        max_senders: string;
        slots: number;
        senders: number;
      }>(
        `SELECT current_setting('wal_level') AS wal_level,
                current_setting('server_version_num') AS version,
                current_setting('max_replication_slots') AS max_slots,
                current_setting('max_wal_senders') AS max_senders,
                (SELECT count(*)::int FROM pg_replication_slots) AS slots,
                (SELECT count(*)::int FROM pg_stat_replication) AS senders`,
      )
    ).rows[0]!;
    add(
      settings.wal_level === 'logical'
        ? { check: 'wal_level', verdict: 'ok', detail: 'logical', fix: null }
        : {
            check: 'wal_level',
            verdict: 'blocker',
            code: 'WAL_LEVEL_NOT_LOGICAL',
            detail: `wal_level is ${settings.wal_level}; logical decoding needs logical`,
            fix: fixFor('WAL_LEVEL_NOT_LOGICAL', source),
          },
    );
    if (!supports(Number(settings.version), 'pgoutput')) {
      add({
        check: 'version',
        verdict: 'blocker',
        detail: `PostgreSQL ${settings.version} has no pgoutput`,
        fix: 'PostgreSQL 10 or later',
      });
    }
    add(protocolFinding(source, Number(settings.version)));
    const role = (
      await client.query<{ replication: boolean; superuser: boolean; name: string }>(
        `SELECT (r.rolsuper OR r.rolreplication OR EXISTS (
                  SELECT 1 FROM pg_roles g
                   WHERE g.rolname = 'rds_replication' AND pg_has_role(current_user, g.oid, 'member'))) AS replication,
                r.rolsuper AS superuser, r.rolname AS name
           FROM pg_roles r WHERE r.rolname = current_user`,
      )
    ).rows[0]!;
    add(
      role.replication
        ? {
            check: 'replication',
            verdict: 'ok',
            detail: `${role.name} may use replication`,
            fix: null,
          }
        : {
            check: 'replication',
            verdict: 'blocker',
            code: 'NO_REPLICATION_ATTRIBUTE',
            detail: `${role.name} has no REPLICATION attribute`,
            fix: fixFor('NO_REPLICATION_ATTRIBUTE', source),
          },
    );

    add(await takeoverFinding(client, source, role, Number(settings.version)));

    const slot = await readSlotState(client, source.slot);
    if (source.failover || slot?.failover === true)
      add(await failoverFinding(client, source, slot, Number(settings.version)));
    const wal = await currentWalLsn(client);
    if (record !== null && role.replication) await checkHistory(client, source, record, add);
    await checkSlot(client, source, slot, wal, settings, record, bufferRead, add);
    await checkPublication(client, source, role.superuser, record, add);
    if (source.ddl) await checkDdlCapture(client, source, Number(settings.version), add);
  });
}

/**
 * A failover slot (PostgreSQL 17+): whether the slot has FAILOVER, and whether the primary
 * holds logical changes back until a standby has them (synchronized_standby_slots) — without
 * that, a promoted standby may lack WAL the buffer already holds, a fork before the checkpoint.
 * Whether a standby has the slot synced shows on the standby (pg_replication_slots.synced).
 */
async function failoverFinding(
  client: pg.Client,
  source: SourceConfig,
  slot: SlotState | null,
  version: number,
): Promise<Omit<Finding, 'target'>> {
  if (!supports(version, 'failoverSlots'))
    return {
      check: 'failover',
      verdict: 'blocker',
      code: 'SERVER_TOO_OLD',
      detail: `failover: true, but PostgreSQL ${version} has no failover slots (version 17 or later)`,
      fix: 'set failover: false for this source',
    };
  if (slot !== null && slot.failover !== true)
    return {
      check: 'failover',
      verdict: 'warning',
      detail: `failover: true, but slot ${source.slot} was created without FAILOVER: a standby does not keep it`,
      fix: `on a replication connection (psql "dbname=${source.connection.database} replication=database"): ALTER_REPLICATION_SLOT ${source.slot} (FAILOVER true)`,
    };
  const standby = (
    await client.query<{ names: string; active: string[] | null; missing: string[] | null }>(
      `WITH s AS (SELECT trim(n) AS n FROM unnest(string_to_array(
                    current_setting('synchronized_standby_slots', true), ',')) n WHERE trim(n) <> '')
       SELECT coalesce(current_setting('synchronized_standby_slots', true), '') AS names,
              (SELECT array_agg(n) FROM s JOIN pg_replication_slots r ON r.slot_name = s.n AND r.active) AS active,
              (SELECT array_agg(n) FROM s WHERE n NOT IN (SELECT slot_name FROM pg_replication_slots)) AS missing`,
    )
  ).rows[0]!;
  const what =
    slot === null
      ? 'the first start creates the slot with FAILOVER'
      : `slot ${source.slot} has FAILOVER`;
  if (standby.names.trim() === '')
    return {
      check: 'failover',
      verdict: 'warning',
      detail: `${what}, but synchronized_standby_slots is empty: Philotes may receive changes a standby does not have yet, and after promoting it the buffer holds a history the new primary lacks (SOURCE_DIVERGED)`,
      fix: "on the primary: synchronized_standby_slots = '<the standby's physical slot>' (and on the standby sync_replication_slots = on, hot_standby_feedback = on, a dbname in primary_conninfo)",
    };
  if (standby.missing !== null)
    return {
      check: 'failover',
      verdict: 'warning',
      detail: `${what}; synchronized_standby_slots names ${standby.missing.join(', ')}, which does not exist: logical decoding waits for it`,
      fix: 'create that physical slot for the standby, or correct synchronized_standby_slots',
    };
  return {
    check: 'failover',
    verdict: 'ok',
    detail: `${what}; changes reach Philotes only once standby slot(s) ${standby.names} have them (${standby.active === null ? 'none streaming now' : `streaming: ${standby.active.join(', ')}`}); on the standby, pg_replication_slots.synced says whether it holds the slot`,
    fix: null,
  };
}

/**
 * Whether a replica that takes the source over may terminate the walsender an earlier Philotes
 * reader left streaming the slot (source-admin.ts takeOverSlot), and how long the server keeps
 * one it may not.
 */
async function takeoverFinding(
  client: pg.Client,
  source: SourceConfig,
  role: { superuser: boolean; name: string },
  version: number,
): Promise<Omit<Finding, 'target'>> {
  const signal = (
    await client.query<{ ok: boolean }>(
      `SELECT pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') AS ok`,
    )
  ).rows[0]!.ok;
  const timeout = source.settings.walSenderTimeoutMs;
  const perSession = supports(version, 'walSenderTimeoutPerSession');
  const fallback =
    timeout > 0 && perSession
      ? `the source frees it after walSenderTimeout (${timeout / 1000} s)`
      : "the source frees it after the server's wal_sender_timeout";
  if (timeout > 0 && !perSession)
    return {
      check: 'slot takeover',
      verdict: 'warning',
      detail: `PostgreSQL ${version} cannot take wal_sender_timeout from the replication connection (12 or later can): a replica that vanished holds the slot until the server's wal_sender_timeout`,
      fix: 'lower wal_sender_timeout on the server, or leave walSenderTimeout at 0 to say you accept it',
    };
  return {
    check: 'slot takeover',
    verdict: 'ok',
    detail:
      role.superuser || signal
        ? `${role.name} may terminate a stale walsender of any role (${role.superuser ? 'superuser' : 'pg_signal_backend'}), so a replica that takes the source over starts at once`
        : `${role.name} may terminate a stale walsender of its own role (the replicas of this configuration); one of another role is not terminated: ${fallback}`,
    fix: null,
  };
}

/** Which pgoutput protocol the source will use, and whether its server has it. */
function protocolFinding(source: SourceConfig, version: number): Omit<Finding, 'target'> {
  const protocol = pgoutputProtocol(source, version);
  if (protocol === null) {
    return {
      check: 'protocol',
      verdict: 'blocker',
      code: 'SERVER_TOO_OLD',
      detail: `protocol 2 is configured; PostgreSQL ${version} has only protocol 1`,
      fix: 'protocol: 1 or auto for this source',
    };
  }
  return {
    check: 'protocol',
    verdict: 'ok',
    detail:
      protocol === 2
        ? 'pgoutput protocol 2: large transactions are streamed while in progress'
        : `pgoutput protocol 1: the source spills large transactions to its disk until they commit${source.protocol === 1 && supports(version, 'streamingProtocol') ? ' (protocol: 1 is configured)' : ''}`,
    fix: null,
  };
}

/** `ddl: true`: the event trigger is current, or Philotes may install it. */
async function checkDdlCapture(
  client: pg.Client,
  source: SourceConfig,
  version: number,
  add: AddFinding,
): Promise<void> {
  if (!supports(version, 'logicalMessages')) {
    add({
      check: 'ddl capture',
      verdict: 'blocker',
      code: 'SERVER_TOO_OLD',
      detail: `PostgreSQL ${version} cannot send logical messages to pgoutput`,
      fix: 'PostgreSQL 14 or later, or ddl: false',
    });
    return;
  }
  const state = await readDdlTriggerState(client);
  if (ddlTriggerCurrent(state)) {
    add({
      check: 'ddl capture',
      verdict: 'ok',
      detail: `event trigger installed (version ${state.version})`,
      fix: null,
    });
  } else if (state.canInstall) {
    add({
      check: 'ddl capture',
      verdict: 'ok',
      detail:
        state.version === null
          ? 'event trigger not installed yet; Philotes installs it at start (the role is a superuser)'
          : `event trigger version ${state.version} will be upgraded at start`,
      fix: null,
    });
  } else {
    add({
      check: 'ddl capture',
      verdict: 'blocker',
      code: 'DDL_TRIGGER_MISSING',
      detail:
        state.version === null
          ? 'the DDL capture event trigger is not installed and the role may not create event triggers'
          : `the DDL capture event trigger (version ${state.version}) is outdated or disabled and the role may not replace it`,
      fix: `as a superuser: ${workerCommand(source, 'ddl-trigger', `--source ${source.id} --print`)} | psql (database of source ${source.id})`,
    });
  }
}
