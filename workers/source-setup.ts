/**
 * Work on the source over an ordinary (non-replication) connection: preflight checks, the
 * publication and the slot, and catalog lookups the stream does not carry (custom types,
 * primary keys).
 */
import type pg from 'pg';
import type { SourceConfig } from '../src/config.js';
import { FatalSourceError } from '../src/errors.js';
import type { Logger } from '../src/logger.js';
import type { ResolvedColumn, ResolvedRelation } from './decode/events.js';
import type { RelationColumn } from './decode/pgoutput.js';
import { BUILTIN_TYPES, TEXT_TYPE, type TypeInfo, type ValueKind } from './decode/values.js';

export interface PreparedSource {
  readonly serverVersion: number;
  readonly slotCreated: boolean;
  readonly publicationCreated: boolean;
  /** The slot's confirmed_flush_lsn, where the server resumes without an explicit start. */
  readonly confirmedFlushLsn: string | null;
}

function where(source: SourceConfig): string {
  return `${source.connection.host}:${source.connection.port}/${source.connection.database}`;
}

export async function prepareSource(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
): Promise<PreparedSource> {
  const settings = await client.query<{ wal_level: string; version: string }>(
    `SELECT current_setting('wal_level') AS wal_level, current_setting('server_version_num') AS version`,
  );
  const row = settings.rows[0];
  if (!row) throw new Error('could not read server settings');
  if (row.wal_level !== 'logical') {
    throw new FatalSourceError(
      `wal_level is "${row.wal_level}" on ${where(source)}; logical replication needs wal_level = logical (set it in postgresql.conf and restart the server)`,
      'WAL_LEVEL_NOT_LOGICAL',
    );
  }
  const serverVersion = Number(row.version);
  if (serverVersion < 100000) {
    throw new FatalSourceError(
      `PostgreSQL ${serverVersion} on ${where(source)} has no pgoutput; version 10 or later is needed`,
      'SERVER_TOO_OLD',
    );
  }

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
      `user "${role.rows[0].name}" on ${where(source)} cannot use replication slot "${source.slot}": it needs the REPLICATION attribute (ALTER ROLE ${role.rows[0].name} REPLICATION)`,
      'NO_REPLICATION_ATTRIBUTE',
    );
  }

  const publicationCreated = await ensurePublication(client, source, log);
  const slot = await ensureSlot(client, source, log);
  return { serverVersion, publicationCreated, ...slot };
}

async function ensurePublication(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
): Promise<boolean> {
  const existing = await client.query('SELECT 1 FROM pg_publication WHERE pubname = $1', [
    source.publication,
  ]);
  if (existing.rowCount) {
    log.info({ publication: source.publication }, 'publication exists');
    await warnAboutIdentity(client, source.publication, log);
    return false;
  }
  const target =
    source.tables.length === 0
      ? 'FOR ALL TABLES'
      : `FOR TABLE ${source.tables
          .map((t) =>
            t
              .split('.')
              .map((part) => client.escapeIdentifier(part))
              .join('.'),
          )
          .join(', ')}`;
  try {
    await client.query(
      `CREATE PUBLICATION ${client.escapeIdentifier(source.publication)} ${target}`,
    );
  } catch (error) {
    if ((error as { code?: string }).code === '42710') return false; // created concurrently
    const code = (error as { code?: string }).code;
    if (code === '42501') {
      throw new FatalSourceError(
        `cannot create publication "${source.publication}" on ${where(source)}: ${(error as Error).message} (create it as a superuser, or list tables you own in PHILOTES_CDC_TABLES)`,
        code,
      );
    }
    if (code === '42P01') {
      throw new FatalSourceError(
        `cannot create publication "${source.publication}" on ${where(source)}: ${(error as Error).message} (check PHILOTES_CDC_TABLES)`,
        code,
      );
    }
    throw error;
  }
  log.info({ publication: source.publication, target }, 'publication created');
  await warnAboutIdentity(client, source.publication, log);
  return true;
}

/**
 * PostgreSQL rejects UPDATE and DELETE on a published table that has no replica identity (no
 * primary key under the default identity, or identity NONE). Insert-only tables are fine, which
 * is why this warns rather than refuses; an operator must see it either way.
 */
async function warnAboutIdentity(
  client: pg.Client,
  publication: string,
  log: Logger,
): Promise<void> {
  const tables = await tablesWithoutIdentity(client, publication);
  if (tables.length === 0) return;
  log.warn(
    { publication, tables: tables.slice(0, 50), count: tables.length },
    'published tables without a primary key or replica identity: UPDATE and DELETE on them fail on the source (inserts are fine); give them a primary key or REPLICA IDENTITY FULL, or leave them out with PHILOTES_CDC_TABLES',
  );
}

/** Tables in a publication that have no usable replica identity. */
async function tablesWithoutIdentity(client: pg.Client, publication: string): Promise<string[]> {
  const result = await client.query<{ name: string }>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS name
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r'
        AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' AND c.relpersistence = 'p'
        AND (c.relreplident = 'n'
             OR (c.relreplident = 'd' AND NOT EXISTS (
                   SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
        AND EXISTS (
              SELECT 1 FROM pg_publication_tables pt
               WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
      ORDER BY 1`,
    [publication],
  );
  return result.rows.map((r) => r.name);
}

interface SlotRow {
  plugin: string | null;
  slot_type: string;
  database: string | null;
  wal_status: string | null;
  confirmed_flush_lsn: string | null;
}

async function readSlot(client: pg.Client, slot: string): Promise<SlotRow | undefined> {
  const result = await client.query<SlotRow>(
    `SELECT plugin, slot_type, database, wal_status, confirmed_flush_lsn::text AS confirmed_flush_lsn
       FROM pg_replication_slots WHERE slot_name = $1`,
    [slot],
  );
  return result.rows[0];
}

async function ensureSlot(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
): Promise<{ slotCreated: boolean; confirmedFlushLsn: string | null }> {
  let slot = await readSlot(client, source.slot);
  let slotCreated = false;
  if (!slot) {
    try {
      // Waits for transactions running now to finish: a consistent starting point.
      await client.query(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, [
        source.slot,
      ]);
      slotCreated = true;
      log.info({ slot: source.slot }, 'replication slot created');
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === '42501') {
        throw new FatalSourceError(
          `cannot create replication slot "${source.slot}" on ${where(source)}: the user needs the REPLICATION attribute (ALTER ROLE ... REPLICATION)`,
          code,
        );
      }
      if (code === '53400') {
        throw new FatalSourceError(
          `cannot create replication slot "${source.slot}" on ${where(source)}: all replication slots are in use (raise max_replication_slots)`,
          code,
        );
      }
      if (code !== '42710') throw error; // 42710: created concurrently, read it below
    }
    slot = await readSlot(client, source.slot);
    if (!slot) throw new Error(`replication slot "${source.slot}" vanished right after creation`);
  } else {
    log.info(
      { slot: source.slot, confirmedFlushLsn: slot.confirmed_flush_lsn },
      'replication slot exists',
    );
  }
  if (slot.slot_type !== 'logical' || slot.plugin !== 'pgoutput') {
    throw new FatalSourceError(
      `replication slot "${source.slot}" on ${where(source)} is a ${slot.slot_type} slot with plugin ${slot.plugin ?? 'none'}; Philotes needs a logical pgoutput slot (choose another PHILOTES_CDC_REPLICATION_SLOT)`,
      'SLOT_WRONG_KIND',
    );
  }
  if (slot.database !== source.connection.database) {
    throw new FatalSourceError(
      `replication slot "${source.slot}" belongs to database "${slot.database}", not "${source.connection.database}"`,
      'SLOT_WRONG_DATABASE',
    );
  }
  if (slot.wal_status === 'lost') {
    throw new FatalSourceError(
      `replication slot "${source.slot}" on ${where(source)} has been invalidated (its WAL was removed, see max_slot_wal_keep_size); changes since its last confirmed position are gone: drop the slot and re-snapshot`,
      'SLOT_INVALIDATED',
    );
  }
  return { slotCreated, confirmedFlushLsn: slot.confirmed_flush_lsn };
}

interface TypeRow {
  oid: number;
  typname: string;
  typtype: string;
  typcategory: string;
  typelem: number;
  typdelim: string;
  typbasetype: number;
}

/**
 * Resolves relation columns to value types and primary keys. Built-in types need no query;
 * others (enums, domains, arrays of them, extension types) are looked up once and cached.
 */
export class CatalogResolver {
  private readonly types = new Map<number, TypeInfo>(BUILTIN_TYPES);

  constructor(private readonly client: pg.Client) {}

  async resolveRelation(
    relationOid: number,
    schema: string,
    table: string,
    columns: readonly RelationColumn[],
  ): Promise<ResolvedRelation> {
    await this.loadTypes(columns.map((c) => c.typeOid));
    const resolved: ResolvedColumn[] = columns.map((c) => ({
      name: c.name,
      type: this.types.get(c.typeOid) ?? { ...TEXT_TYPE, oid: c.typeOid, name: `oid:${c.typeOid}` },
      typeMod: c.typeMod,
      key: (c.flags & 1) !== 0,
    }));
    // The catalog is read as it is now, not as it was at this point of the WAL; a table dropped
    // since has no row, and then the replica identity columns stand in for the key.
    const pk = await this.client.query<{ attname: string }>(
      `SELECT a.attname
         FROM pg_index i
         JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = $1 AND i.indisprimary
        ORDER BY k.ord`,
      [relationOid],
    );
    const primaryKey =
      pk.rows.length > 0
        ? pk.rows.map((r) => r.attname)
        : resolved.filter((c) => c.key).map((c) => c.name);
    return { oid: relationOid, schema, table, columns: resolved, primaryKey };
  }

  private async loadTypes(oids: readonly number[]): Promise<void> {
    let missing = [...new Set(oids.filter((oid) => !this.types.has(oid)))];
    const rows = new Map<number, TypeRow>();
    // Walk element and base types until everything referenced is known.
    while (missing.length > 0) {
      const result = await this.client.query<TypeRow>(
        `SELECT oid::int8 AS oid, typname, typtype, typcategory, typelem::int8 AS typelem, typdelim, typbasetype::int8 AS typbasetype
           FROM pg_type WHERE oid = ANY($1::oid[])`,
        [missing],
      );
      const next: number[] = [];
      for (const raw of result.rows) {
        const row = {
          ...raw,
          oid: Number(raw.oid),
          typelem: Number(raw.typelem),
          typbasetype: Number(raw.typbasetype),
        };
        rows.set(row.oid, row);
        for (const ref of [row.typelem, row.typbasetype]) {
          if (ref !== 0 && !this.types.has(ref) && !rows.has(ref)) next.push(ref);
        }
      }
      missing = [...new Set(next)];
    }
    const build = (oid: number, depth: number): TypeInfo => {
      const known = this.types.get(oid);
      if (known) return known;
      const row = rows.get(oid);
      if (!row || depth > 10) return { ...TEXT_TYPE, oid, name: `oid:${oid}` };
      let info: TypeInfo;
      if (row.typcategory === 'A' && row.typelem !== 0) {
        info = {
          oid,
          name: row.typname,
          kind: 'array',
          element: build(row.typelem, depth + 1),
          delimiter: row.typdelim,
        };
      } else if (row.typtype === 'd' && row.typbasetype !== 0) {
        // A domain keeps its base type's JSON form.
        const base = build(row.typbasetype, depth + 1);
        info = { ...base, oid, name: row.typname };
      } else {
        info = { oid, name: row.typname, kind: 'string' as ValueKind };
      }
      this.types.set(oid, info);
      return info;
    };
    for (const oid of rows.keys()) build(oid, 0);
  }
}
