/**
 * `philotes-worker check`: a preflight of the buffer and every configured source that changes
 * nothing — no migration, no slot, no publication. Each finding is ok, a warning (Philotes runs,
 * but something needs a look) or a blocker (the source, or everything, cannot capture), with how
 * to fix it. Sources are checked at once, each on its own connection; one that cannot be reached
 * is a blocker in its own rows and hides nothing else.
 */
import { ddlTriggerCurrent, readDdlTriggerState } from './common/ddl-capture.js';
import pg from 'pg';
import type { Config, ConnectionConfig, SourceConfig } from './common/config.js';
import { BUFFER_TABLES } from './common/database-identity.js';
import { describeConnectionError } from './common/errors.js';
import { formatBytes, formatLsn, parseLsn } from './common/lsn.js';
import { pgClientOptions } from './common/pg-connection.js';
import {
  currentWalLsn,
  findGap,
  isInvalidated,
  pgoutputProtocol,
  publicationExists,
  readSlotState,
  resetCommand,
  retainedWalBytes,
  slotHolder,
  tablesWithoutChunkKey,
  tablesWithoutIdentity,
  type SlotState,
} from './common/source-admin.js';
import { compareHistory, divergenceSummary, storedHistoryOfRow } from './common/source-history.js';
import { SCHEMA_VERSION } from './buffer/migrations.js';

export type Verdict = 'ok' | 'warning' | 'blocker';

export interface Finding {
  /** `buffer`, or the source's id. */
  readonly target: string;
  readonly check: string;
  readonly verdict: Verdict;
  readonly detail: string;
  /** What to do about it, for a warning or a blocker. */
  readonly fix: string | null;
}

/** 0 all ok, 1 warnings, 2 blockers: the exit code of `check`. */
export function exitCode(findings: readonly Finding[]): number {
  if (findings.some((f) => f.verdict === 'blocker')) return 2;
  if (findings.some((f) => f.verdict === 'warning')) return 1;
  return 0;
}

interface BufferRecord {
  lsn: string;
  confirmed_lsn: string | null;
  /** The whole row: the identity columns exist from buffer schema 6 on. */
  row: Record<string, unknown>;
}

export async function runChecks(config: Config): Promise<Finding[]> {
  const buffer = await checkBuffer(config);
  const perSource = await Promise.all(
    config.sources.map((source) =>
      checkSource(source, buffer.records?.get(source.id) ?? null, buffer.records !== null),
    ),
  );
  return [...buffer.findings, ...perSource.flat()];
}

/** Runs `body` on a fresh connection; a connection failure becomes the blocker it is. */
async function withClient(
  target: string,
  side: 'source' | 'buffer',
  conn: ConnectionConfig,
  body: (client: pg.Client, add: (f: Omit<Finding, 'target'>) => void) => Promise<void>,
): Promise<Finding[]> {
  const findings: Finding[] = [];
  const add = (f: Omit<Finding, 'target'>) => findings.push({ target, ...f });
  const client = new pg.Client(pgClientOptions(conn, 'philotes:check'));
  client.on('error', () => undefined); // a lost connection rejects the query in flight
  try {
    await client.connect();
  } catch (error) {
    const described = describeConnectionError(error, side, conn.host, conn.port);
    add({
      check: 'connection',
      verdict: 'blocker',
      detail: described instanceof Error ? described.message : String(described),
      fix: connectionFix((error as { code?: string }).code),
    });
    return findings;
  }
  try {
    const [version] = (
      await client.query<{ v: string }>(`SELECT current_setting('server_version') AS v`)
    ).rows;
    add({
      check: 'connection',
      verdict: 'ok',
      detail: `PostgreSQL ${version?.v ?? '?'} at ${conn.host}:${conn.port}/${conn.database} as ${conn.user}`,
      fix: null,
    });
    await body(client, add);
  } catch (error) {
    add({ check: 'queries', verdict: 'blocker', detail: (error as Error).message, fix: null });
  } finally {
    await client.end().catch(() => undefined);
  }
  return findings;
}

function connectionFix(code: string | undefined): string {
  switch (code) {
    case '28P01':
    case '28000':
      return 'check the user and password (and pg_hba.conf)';
    case '3D000':
      return 'check the database name, or create the database';
    case 'ECONNREFUSED':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'ETIMEDOUT':
      return 'check host and port, and that the server runs and accepts connections from here';
    default:
      return 'see the message';
  }
}

async function checkBuffer(
  config: Config,
): Promise<{ findings: Finding[]; records: Map<string, BufferRecord> | null }> {
  let records: Map<string, BufferRecord> | null = null;
  const findings = await withClient('buffer', 'buffer', config.buffer, async (client, add) => {
    const version = Number(
      (await client.query<{ v: string }>(`SELECT current_setting('server_version_num') AS v`))
        .rows[0]?.v,
    );
    if (version < 130000) {
      add({
        check: 'version',
        verdict: 'blocker',
        detail: `PostgreSQL ${version}; the buffer needs 13 or later (gen_random_uuid)`,
        fix: 'use a newer server for the buffer',
      });
    }
    const present = await client.query<{ name: string }>(
      `SELECT t AS name FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL`,
      [BUFFER_TABLES],
    );
    const tables = new Set(present.rows.map((r) => r.name));
    const applied = tables.has('philotes_migrations')
      ? Number(
          (
            await client.query<{ v: number | null }>(
              'SELECT max(version) AS v FROM philotes_migrations',
            )
          ).rows[0]?.v ?? 0,
        )
      : 0;
    const canCreate = (
      await client.query<{ ok: boolean }>(
        `SELECT has_schema_privilege(current_schema(), 'CREATE') AS ok`,
      )
    ).rows[0]?.ok;
    if (applied > SCHEMA_VERSION) {
      add({
        check: 'schema',
        verdict: 'blocker',
        detail: `buffer schema version ${applied} is newer than this Philotes knows (${SCHEMA_VERSION})`,
        fix: 'run the Philotes version that migrated it, or a newer one',
      });
    } else if (applied < SCHEMA_VERSION) {
      add({
        check: 'schema',
        verdict: canCreate ? 'ok' : 'blocker',
        detail:
          applied === 0
            ? `no Philotes tables yet: the first start creates them (schema version ${SCHEMA_VERSION})`
            : `schema version ${applied}: the next start migrates it to ${SCHEMA_VERSION}`,
        fix: canCreate
          ? null
          : `GRANT CREATE ON SCHEMA <schema> TO ${config.buffer.user}, or migrate once as an owner`,
      });
    } else {
      add({ check: 'schema', verdict: 'ok', detail: `schema version ${applied}`, fix: null });
    }
    const missing: string[] = [];
    // What a run needs on the data tables (philotes_migrations only matters when migrating).
    const dataTables = BUFFER_TABLES.filter((t) => t !== 'philotes_migrations');
    for (const table of dataTables.filter((t) => tables.has(t))) {
      for (const privilege of ['SELECT', 'INSERT', 'UPDATE', 'DELETE']) {
        const ok = (
          await client.query<{ ok: boolean }>('SELECT has_table_privilege($1, $2) AS ok', [
            table,
            privilege,
          ])
        ).rows[0]?.ok;
        if (!ok) missing.push(`${privilege} on ${table}`);
      }
    }
    add(
      missing.length === 0
        ? {
            check: 'privileges',
            verdict: 'ok',
            detail: 'can read and write the Philotes tables',
            fix: null,
          }
        : {
            check: 'privileges',
            verdict: 'blocker',
            detail: `${config.buffer.user} lacks ${missing.join(', ')}`,
            fix: `GRANT SELECT, INSERT, UPDATE, DELETE ON ${dataTables.join(', ')} TO ${config.buffer.user}`,
          },
    );
    records = new Map();
    if (tables.has('cdc_checkpoints')) {
      const rows = await client.query<BufferRecord & { source_id: string }>(
        `SELECT source_id, lsn, confirmed_lsn::text, to_jsonb(c) AS row
           FROM cdc_checkpoints c WHERE source_id = ANY($1)`,
        [config.sources.map((s) => s.id)],
      );
      for (const row of rows.rows) records.set(row.source_id, row);
    }
  });
  return { findings, records };
}

async function checkSource(
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
            detail: `wal_level is ${settings.wal_level}; logical decoding needs logical`,
            fix: 'ALTER SYSTEM SET wal_level = logical, then restart the server',
          },
    );
    if (Number(settings.version) < 100000) {
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
            detail: `${role.name} has no REPLICATION attribute`,
            fix: `ALTER ROLE ${role.name} REPLICATION`,
          },
    );

    const slot = await readSlotState(client, source.slot);
    const wal = await currentWalLsn(client);
    if (record !== null && role.replication) await checkHistory(client, source, record, add);
    await checkSlot(client, source, slot, wal, settings, record, bufferRead, add);
    await checkPublication(client, source, role.superuser, record, add);
    if (source.ddl) await checkDdlCapture(client, source, Number(settings.version), add);
  });
}

/** Whether the server is still the history the buffer holds (see source-history.ts). */
async function checkHistory(
  client: pg.Client,
  source: SourceConfig,
  record: BufferRecord,
  add: (f: Omit<Finding, 'target'>) => void,
): Promise<void> {
  const stored = storedHistoryOfRow(record.row);
  const identity = stored.identity;
  const { server, error } = await compareHistory(client, source, 'philotes:check', stored);
  if (error !== null) {
    add({
      check: 'history',
      verdict: 'blocker',
      detail: divergenceSummary(error),
      fix: `${resetCommand(source.id)}${error.code === 'SOURCE_REPLACED' ? ' --snapshot' : ''} (retracts the buffer's events of the lost history and records what was lost)`,
    });
    return;
  }
  const now = server.identity;
  add({
    check: 'history',
    verdict: 'ok',
    detail:
      identity === null
        ? `system ${now.systemId}, timeline ${now.timeline} (the buffer has not recorded an identity for this source yet: the next start records it)`
        : `the same server and history as the buffer's events (system ${now.systemId}, timeline ${now.timeline}${now.timeline !== identity.timeline ? `, which left timeline ${identity.timeline} after the checkpoint` : ''})`,
    fix: null,
  });
}

/** Which pgoutput protocol the source will use, and whether its server has it. */
function protocolFinding(source: SourceConfig, version: number): Omit<Finding, 'target'> {
  const protocol = pgoutputProtocol(source, version);
  if (protocol === null) {
    return {
      check: 'protocol',
      verdict: 'blocker',
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
        : `pgoutput protocol 1: the source spills large transactions to its disk until they commit${source.protocol === 1 && version >= 140000 ? ' (protocol: 1 is configured)' : ''}`,
    fix: null,
  };
}

/** `ddl: true`: the event trigger is current, or Philotes may install it. */
async function checkDdlCapture(
  client: pg.Client,
  source: SourceConfig,
  version: number,
  add: (f: Omit<Finding, 'target'>) => void,
): Promise<void> {
  if (version < 140000) {
    add({
      check: 'ddl capture',
      verdict: 'blocker',
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
      detail:
        state.version === null
          ? 'the DDL capture event trigger is not installed and the role may not create event triggers'
          : `the DDL capture event trigger (version ${state.version}) is outdated or disabled and the role may not replace it`,
      fix: `as a superuser: philotes-worker ddl-trigger --print | psql (database of source ${source.id})`,
    });
  }
}

async function checkSlot(
  client: pg.Client,
  source: SourceConfig,
  slot: SlotState | null,
  wal: bigint,
  settings: { max_slots: string; max_senders: string; slots: number; senders: number },
  record: BufferRecord | null,
  bufferRead: boolean,
  add: (f: Omit<Finding, 'target'>) => void,
): Promise<void> {
  const name = `slot ${source.slot}`;
  if (slot === null) {
    if (record !== null) {
      add({
        check: 'slot',
        verdict: 'blocker',
        detail: `${name} is missing, but the buffer holds this source up to ${record.lsn}: the changes since are in no stream`,
        fix: resetCommand(source.id),
      });
    } else if (settings.slots >= Number(settings.max_slots)) {
      add({
        check: 'slot',
        verdict: 'blocker',
        detail: `${name} does not exist and all ${settings.max_slots} replication slots are taken`,
        fix: 'raise max_replication_slots (restart), or drop an unused slot',
      });
    } else {
      add({
        check: 'slot',
        verdict: 'ok',
        detail: `${name} does not exist yet: the first start creates it`,
        fix: null,
      });
    }
  } else if (slot.slotType !== 'logical' || slot.plugin !== 'pgoutput') {
    add({
      check: 'slot',
      verdict: 'blocker',
      detail: `${name} is a ${slot.slotType} slot with plugin ${slot.plugin ?? 'none'}`,
      fix: 'choose another slot name (Philotes needs a logical pgoutput slot)',
    });
  } else if (slot.database !== source.connection.database) {
    add({
      check: 'slot',
      verdict: 'blocker',
      detail: `${name} belongs to database ${slot.database}`,
      fix: 'choose another slot name, or the right database',
    });
  } else {
    const retained = retainedWalBytes(slot, wal);
    const holds = retained === null ? '' : `, retains ${formatBytes(BigInt(retained))} of WAL`;
    const owner =
      slot.activePid === null ? '' : (await slotHolder(client, slot.activePid)).applicationName;
    if (isInvalidated(slot)) {
      add({
        check: 'slot',
        verdict: 'blocker',
        detail: `${name} is invalidated (${slot.invalidationReason ?? `wal_status ${slot.walStatus}`}): the WAL it needed is gone`,
        fix: resetCommand(source.id),
      });
    } else if (slot.active && !owner.startsWith('philotes')) {
      add({
        check: 'slot',
        verdict: 'blocker',
        detail: `${name} is in use by ${owner || 'another client'} (pid ${slot.activePid})${holds}`,
        fix: 'stop that client; only one consumer can stream a slot',
      });
    } else if (slot.walStatus === 'unreserved') {
      add({
        check: 'slot',
        verdict: 'warning',
        detail: `${name} has wal_status unreserved${holds}: the server is about to remove WAL it needs`,
        fix: 'let Philotes catch up now, or raise max_slot_wal_keep_size',
      });
    } else {
      add({
        check: 'slot',
        verdict: 'ok',
        detail: `${name}, wal_status ${slot.walStatus ?? 'unknown'}${holds}${slot.active ? `, streamed by ${owner} (pid ${slot.activePid})` : ', not in use'}`,
        fix: null,
      });
    }
    if (record !== null && !isInvalidated(slot)) {
      const checkpoint = parseLsn(record.lsn);
      const confirmed = record.confirmed_lsn === null ? checkpoint : parseLsn(record.confirmed_lsn);
      const gap = findGap({ checkpointLsn: checkpoint, confirmedLsn: confirmed }, slot, wal);
      if (gap !== null) {
        add({
          check: 'continuity',
          verdict: 'blocker',
          detail: `${name} was advanced by another client to ${formatLsn(gap.toLsn)}, past anything Philotes stored or confirmed (${formatLsn(gap.fromLsn)}): ${formatBytes(gap.toLsn - gap.fromLsn)} of WAL would be skipped`,
          fix: resetCommand(source.id),
        });
      } else {
        add({
          check: 'continuity',
          verdict: 'ok',
          detail: `the slot can deliver everything after the checkpoint ${record.lsn}`,
          fix: null,
        });
      }
    }
  }
  if (!bufferRead) {
    add({
      check: 'continuity',
      verdict: 'warning',
      detail: 'the buffer could not be read: the slot was not compared with its checkpoint',
      fix: null,
    });
  }
  const senders = Number(settings.max_senders) - settings.senders;
  if (!slot?.active && senders <= 0) {
    add({
      check: 'wal_senders',
      verdict: 'blocker',
      detail: `all ${settings.max_senders} WAL senders are in use`,
      fix: 'raise max_wal_senders (restart)',
    });
  }
}

async function checkPublication(
  client: pg.Client,
  source: SourceConfig,
  superuser: boolean,
  record: BufferRecord | null,
  add: (f: Omit<Finding, 'target'>) => void,
): Promise<void> {
  const name = `publication ${source.publication}`;
  if (await publicationExists(client, source.publication)) {
    const covered = await client.query<{ name: string }>(
      `SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1`,
      [source.publication],
    );
    const names = covered.rows.map((r) => r.name);
    const notCovered = source.tables.filter((t) => !names.includes(t));
    add(
      notCovered.length === 0
        ? {
            check: 'publication',
            verdict: 'ok',
            detail: `${name} covers ${names.length} table(s)`,
            fix: null,
          }
        : {
            check: 'publication',
            verdict: 'warning',
            detail: `${name} exists but does not cover ${notCovered.join(', ')} (Philotes does not change an existing publication)`,
            fix: `ALTER PUBLICATION ${source.publication} ADD TABLE ${notCovered.join(', ')}`,
          },
    );
    reportIdentity(await tablesWithoutIdentity(client, source.publication), add);
    if (source.snapshot !== 'never') {
      const keyless = await tablesWithoutChunkKey(client, source.publication);
      if (keyless.length > 0)
        add({
          check: 'snapshot',
          verdict: 'warning',
          detail: `a snapshot cannot copy ${keyless.slice(0, 10).join(', ')}${keyless.length > 10 ? ` and ${keyless.length - 10} more` : ''}: no primary key and no unique index on NOT NULL columns (their rows are skipped_no_key; their changes are captured)`,
          fix: 'give each a primary key or a unique index on NOT NULL columns (README: Tables without a primary key)',
        });
    }
    return;
  }
  if (record !== null) {
    add({
      check: 'publication',
      verdict: 'blocker',
      detail: `${name} is missing, but the buffer holds this source's changes: those committed while it was missing cannot be decoded`,
      fix: resetCommand(source.id, ' --skip-to-current'),
    });
    return;
  }
  // Philotes will create it at the first start: can it?
  const wanted = source.tables;
  const missing =
    wanted.length === 0
      ? []
      : (
          await client.query<{ name: string }>(
            `SELECT t AS name FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NULL`,
            [wanted],
          )
        ).rows.map((r) => r.name);
  const notOwned =
    wanted.length === 0 || superuser
      ? []
      : (
          await client.query<{ name: string }>(
            `SELECT t AS name FROM unnest($1::text[]) AS t
              WHERE to_regclass(t) IS NOT NULL
                AND NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = to_regclass(t)), 'USAGE')`,
            [wanted],
          )
        ).rows.map((r) => r.name);
  if (missing.length > 0) {
    add({
      check: 'publication',
      verdict: 'blocker',
      detail: `${name} would cover ${missing.join(', ')}, which do not exist`,
      fix: 'check the tables setting',
    });
  } else if (wanted.length === 0 && !superuser) {
    add({
      check: 'publication',
      verdict: 'blocker',
      detail: `${name} does not exist, and creating it FOR ALL TABLES needs a superuser`,
      fix: `CREATE PUBLICATION ${source.publication} FOR ALL TABLES as a superuser, or list tables the user owns (tables)`,
    });
  } else if (notOwned.length > 0) {
    add({
      check: 'publication',
      verdict: 'blocker',
      detail: `${name} does not exist, and the user does not own ${notOwned.join(', ')}`,
      fix: `create the publication as the owner or a superuser`,
    });
  } else {
    add({
      check: 'publication',
      verdict: 'ok',
      detail: `${name} does not exist yet: the first start creates it ${wanted.length === 0 ? 'FOR ALL TABLES' : `for ${wanted.length} table(s)`}`,
      fix: null,
    });
  }
  const unkeyed = await client.query<{ name: string }>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS name
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r' AND c.relpersistence = 'p'
        AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
        AND (cardinality($1::text[]) = 0 OR c.oid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) t))
        AND (c.relreplident = 'n'
             OR (c.relreplident = 'd' AND NOT EXISTS (
                   SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
      ORDER BY 1`,
    [wanted],
  );
  reportIdentity(
    unkeyed.rows.map((r) => r.name),
    add,
  );
}

function reportIdentity(
  tables: readonly string[],
  add: (f: Omit<Finding, 'target'>) => void,
): void {
  if (tables.length === 0) {
    add({
      check: 'replica identity',
      verdict: 'ok',
      detail: 'every published table has a key or a replica identity',
      fix: null,
    });
    return;
  }
  const shown =
    tables.slice(0, 5).join(', ') + (tables.length > 5 ? ` and ${tables.length - 5} more` : '');
  add({
    check: 'replica identity',
    verdict: 'warning',
    detail: `${tables.length} published table(s) without a primary key or replica identity: ${shown}; UPDATE and DELETE on them fail on the source`,
    fix: 'add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, or leave them out (tables)',
  });
}
