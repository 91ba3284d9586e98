/**
 * Work on the source over an ordinary (non-replication) connection: preflight checks, the
 * publication and the slot, and catalog lookups the stream does not carry (custom types,
 * primary keys).
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
import { FatalSourceError } from '../src/common/errors.js';
import type { Logger } from '../src/common/logger.js';
import { formatLsn, parseLsn } from '../src/common/lsn.js';
import {
  createPublication,
  createSlot,
  currentWalLsn,
  pgoutputProtocol,
  publicationExists,
  publicationMissingError,
  readSlotState,
  slotVerdict,
  tablesWithoutIdentity,
  where,
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
import type { ResolvedColumn, ResolvedRelation } from './decode/event-rows.js';
import type { RelationColumn } from './decode/pgoutput.js';
import {
  BUILTIN_TYPES,
  moneyType,
  TEXT_TYPE,
  type TypeInfo,
  type ValueKind,
} from './decode/values.js';

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
      `wal_level is "${row.wal_level}" on ${where(source)}; logical replication needs wal_level = logical (set it in postgresql.conf and restart the server)`,
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
      `user "${role.rows[0].name}" on ${where(source)} cannot use replication slot "${source.slot}": it needs the REPLICATION attribute (ALTER ROLE ${role.rows[0].name} REPLICATION)`,
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
  await warnAboutIdentity(client, source.publication, log);

  if (record !== null && stored !== null)
    return {
      serverVersion,
      identity: server.identity,
      nextXid: server.nextXid,
      ddlGap,
      protocol,
      publicationCreated,
      ...(await checkSlot(client, source, log, record, stored, server)),
    };
  return {
    serverVersion,
    identity: server.identity,
    nextXid: server.nextXid,
    ddlGap,
    protocol,
    publicationCreated,
    ...(await newCapture(client, source, log, publicationCreated)),
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
      `DDL capture on ${where(source)} ${what}, and the role cannot install it (event triggers need a superuser): run \`philotes-worker ddl-trigger --source ${source.id} --print | psql <superuser connection>\` once, or set ddl: false`,
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
  warnAboutRetention(slot!, log);
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
  warnAboutRetention(slot, log);
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

/** A slot about to lose WAL it still needs is worth a loud line before it happens. */
function warnAboutRetention(slot: SlotState, log: Logger): void {
  if (slot.walStatus === 'unreserved') {
    log.warn(
      { walStatus: slot.walStatus },
      'the replication slot is about to lose WAL it has not delivered yet (wal_status unreserved, beyond max_slot_wal_keep_size): if it is invalidated, changes are lost and the source stops',
    );
  }
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

interface TypeRow {
  oid: number;
  typname: string;
  typtype: string;
  typcategory: string;
  typelem: number;
  typdelim: string;
  typbasetype: number;
}

/** What a Relation message says about a table: its shape at that point of the WAL. */
export interface StreamRelation {
  readonly relationOid: number;
  readonly schema: string;
  readonly name: string;
  /** pg_class.relreplident as it was: 'd' default (primary key), 'f' full, 'i' index, 'n' nothing. */
  readonly replicaIdentity: string;
  readonly columns: readonly RelationColumn[];
}

/**
 * Resolves relation columns to value types and primary keys. Built-in types need no query;
 * others (enums, domains, arrays of them, extension types) are looked up once and cached.
 *
 * The stream is the truth about a table at each point of the WAL; the catalog describes it as
 * it is now, which differs whenever the reader is behind a DDL (stopped, restarting, lagging).
 * So shape, names and key flags come from the Relation message, type names from the Type
 * messages the stream sends with it, and the catalog only adds what the stream does not carry
 * (a type's kind, the primary key's column order, the primary key under a non-default replica
 * identity) and only where it agrees with the stream.
 */
export class CatalogResolver {
  private readonly types = new Map<number, TypeInfo>(BUILTIN_TYPES);
  /** Type names as the stream's Type messages gave them (they may have been renamed since). */
  private readonly streamTypeNames = new Map<number, string>();
  private moneyChecked = false;

  constructor(
    private readonly client: pg.Client,
    private readonly log?: Logger,
  ) {}

  /** A Type message: the name of a non-built-in type at this point of the WAL. */
  noteType(typeOid: number, name: string): void {
    this.streamTypeNames.set(typeOid, name);
  }

  /**
   * How this source writes money: its lc_monetary decides the decimals (the walsender's session
   * has the same database and role defaults as this one). Asked once, before the first table is
   * resolved; a format it cannot read leaves money as the source's text.
   */
  private async loadMoneyFormat(): Promise<void> {
    if (this.moneyChecked) return;
    this.moneyChecked = true;
    const sample = await this.client.query<{ m: string }>(
      'SELECT (1234567)::numeric::money::text AS m',
    );
    const money = moneyType(sample.rows[0]?.m ?? '');
    if (money === null) {
      this.log?.warn(
        { sample: sample.rows[0]?.m },
        'unrecognised money format (lc_monetary): money values are stored as the text the source writes',
      );
      const text = { ...TEXT_TYPE, oid: 790, name: 'money' };
      this.types.set(790, text);
      this.types.set(791, { ...this.types.get(791)!, element: text });
      return;
    }
    this.types.set(790, money);
    this.types.set(791, { ...this.types.get(791)!, element: money });
  }

  /**
   * A table as the catalog describes it now, in the shape pgoutput's Relation message would give
   * (stored generated columns left out; the key flags as pgoutput sets them for the table's
   * replica identity: every column for FULL, the identity index's for USING INDEX, the primary
   * key's for DEFAULT): for a snapshot of a table the stream has not described yet. A shape that
   * differed from the stream's would make a spurious schema version when the stream's arrives.
   */
  async resolveCatalogRelation(
    oid: number,
    schema: string,
    name: string,
  ): Promise<ResolvedRelation> {
    const result = await this.client.query<{
      name: string;
      type_oid: number;
      type_mod: number;
      key: boolean;
      identity: string;
    }>(
      `SELECT a.attname AS name, a.atttypid::int AS type_oid, a.atttypmod AS type_mod,
              CASE c.relreplident
                WHEN 'f' THEN true
                WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid
                                         AND i.indisprimary AND a.attnum = ANY (i.indkey))
                WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid
                                         AND i.indisreplident AND a.attnum = ANY (i.indkey))
                ELSE false
              END AS key,
              c.relreplident::text AS identity
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = '' -- snapshots need PostgreSQL 14+
        ORDER BY a.attnum`,
      [oid],
    );
    return this.resolveRelation({
      relationOid: oid,
      schema,
      name,
      replicaIdentity: result.rows[0]?.identity ?? 'd',
      columns: result.rows.map((c) => ({
        flags: c.key ? 1 : 0,
        name: c.name,
        typeOid: c.type_oid,
        typeMod: c.type_mod,
      })),
    });
  }

  async resolveRelation(relation: StreamRelation): Promise<ResolvedRelation> {
    const { relationOid, schema, name: table, columns } = relation;
    // Once per reader, before any type is resolved: domains over money take it as their base.
    await this.loadMoneyFormat();
    await this.loadTypes(columns.map((c) => c.typeOid));
    const resolved: ResolvedColumn[] = columns.map((c) => {
      const type = this.types.get(c.typeOid) ?? {
        ...TEXT_TYPE,
        oid: c.typeOid,
        name: `oid:${c.typeOid}`,
        textForm: true,
      };
      const streamName = this.streamTypeNames.get(c.typeOid);
      return {
        name: c.name,
        type:
          streamName !== undefined && streamName !== type.name
            ? { ...type, name: streamName }
            : type,
        typeMod: c.typeMod,
        key: (c.flags & 1) !== 0,
      };
    });
    const pk = await this.client.query<{ attname: string }>(
      `SELECT a.attname
         FROM pg_index i
         JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = $1 AND i.indisprimary
        ORDER BY k.ord`,
      [relationOid],
    );
    const primaryKey = choosePrimaryKey(
      relation.replicaIdentity,
      resolved,
      pk.rows.map((r) => r.attname),
    );
    if (primaryKey.contradicted) {
      this.log?.info(
        {
          table: `${schema}.${table}`,
          catalogPrimaryKey: primaryKey.catalog,
          primaryKey: primaryKey.names,
        },
        'the primary key in the catalog today does not match this point of the stream (the table changed since); the key comes from the stream',
      );
    }
    return { oid: relationOid, schema, table, columns: resolved, primaryKey: primaryKey.names };
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
      if (!row || depth > 10) return { ...TEXT_TYPE, oid, name: `oid:${oid}`, textForm: true };
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
        // Enums are strings by rule; anything else without a rule is its text output.
        info = {
          oid,
          name: row.typname,
          kind: 'string' as ValueKind,
          ...(row.typtype === 'e' ? {} : { textForm: true }),
        };
      }
      this.types.set(oid, info);
      return info;
    };
    for (const oid of rows.keys()) build(oid, 0);
  }
}

/**
 * The primary key of a relation at a point of the stream.
 *
 * Under the default replica identity the stream's key flags mark exactly the primary key's
 * columns as they were then: they are the truth, and the catalog only contributes the key's
 * column order, when it names the same columns. Under REPLICA IDENTITY FULL, USING INDEX or
 * NOTHING the stream does not say which columns form the primary key: the catalog's is taken when
 * every column it names is in the stream's column list, otherwise (a key column renamed or
 * dropped since) the replica identity columns stand in, as for a table without a primary key.
 */
export function choosePrimaryKey(
  replicaIdentity: string,
  columns: ReadonlyArray<{ readonly name: string; readonly key: boolean }>,
  catalogPrimaryKey: readonly string[],
): { names: string[]; catalog: string[]; contradicted: boolean } {
  const flagged = columns.filter((c) => c.key).map((c) => c.name);
  const catalog = [...catalogPrimaryKey];
  if (replicaIdentity === 'd') {
    const sameSet =
      catalog.length === flagged.length && catalog.every((name) => flagged.includes(name));
    return { names: sameSet ? catalog : flagged, catalog, contradicted: !sameSet };
  }
  const names = new Set(columns.map((c) => c.name));
  const fits = catalog.every((name) => names.has(name));
  if (catalog.length > 0 && fits) return { names: catalog, catalog, contradicted: false };
  return { names: flagged, catalog, contradicted: catalog.length > 0 };
}
