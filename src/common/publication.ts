/**
 * The publication Philotes creates, and the one rule for tables without a replica identity.
 *
 * PostgreSQL refuses UPDATE and DELETE on a published table that has no replica identity (no
 * primary key under the default identity, identity NOTHING, or an identity index that is gone):
 * `cannot update table … because it does not have a replica identity and publishes updates`. A
 * CDC tool must never make the application's writes fail, so what a publication Philotes creates
 * does with such tables is the source's `keylessTables` (config-types.ts):
 *
 * - `block` (the default): the publication is not created; the source stops and names the tables.
 * - `leave_out`: the publication lists every other table, and Philotes keeps it current while it
 *   runs: a new table (or one that gained a key) is added, a published one that lost its key is
 *   dropped. A table added after capture began gets a snapshot asked for before it is added, so
 *   its rows written before it joined are copied (docs/design/publication.md has the argument).
 * - `identity_full`: those tables get REPLICA IDENTITY FULL (the role must own them), at creation
 *   and as Philotes finds new ones.
 * - `accept`: published anyway, with a warning; their UPDATE and DELETE fail on the source.
 *
 * `planPublication` is the verdict the run acts on when it creates the publication and `check`
 * prints before it; `planKeeping` is what the keeper does to a publication Philotes made (marked
 * by its comment). A publication the user made stays theirs: it is never changed.
 */
import type pg from 'pg';
import type { KeylessTables, SourceConfig } from './config-types.js';
import { FatalSourceError } from './errors.js';
import { policyOf } from './error-policy.js';
import type { Logger } from './logger.js';
import { supports } from './server-features.js';
import { where } from './source-names.js';

/** The comment a publication Philotes creates carries: what marks it as Philotes' to keep. */
const MANAGED_PREFIX = 'created by Philotes';

/**
 * DDL that waits for a lock puts every later query on the table in the queue behind it: a CDC
 * tool must not stall the application for its housekeeping, so it gives up and tries again.
 */
const DDL_LOCK_TIMEOUT = '2s';

/**
 * True for a plain table (alias `l`) whose UPDATE and DELETE PostgreSQL refuses once published:
 * the default identity without a primary key, identity NOTHING, or an identity index dropped.
 */
function noIdentity(l: string): string {
  return `(${l}.relreplident = 'n'
    OR (${l}.relreplident = 'd' AND NOT EXISTS (
          SELECT 1 FROM pg_index i WHERE i.indrelid = ${l}.oid AND i.indisprimary))
    OR (${l}.relreplident = 'i' AND NOT EXISTS (
          SELECT 1 FROM pg_index i WHERE i.indrelid = ${l}.oid AND i.indisreplident)))`;
}

/** Ordinary user tables: what FOR ALL TABLES publishes. */
const USER_TABLE = `c.relpersistence = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'`;

export interface CoveredTable {
  /** `schema.table`, quoted where PostgreSQL needs it (format %I.%I). */
  readonly name: string;
  /** It (or, for a partitioned table, one of its partitions) has no replica identity. */
  readonly keyless: boolean;
  /** The role owns it (may ALTER it), or is a superuser. */
  readonly owned: boolean;
}

/**
 * The tables a publication created now would cover: the configured `tables`, or every user table
 * (a partitioned table once, by its root: listing the root covers its partitions).
 */
export async function coveredTables(
  client: pg.Client,
  tables: readonly string[],
): Promise<CoveredTable[]> {
  const result = await client.query<CoveredTable>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS name,
            -- pg_partition_tree has no rows for a table that is not partitioned.
            CASE WHEN c.relkind = 'r' THEN ${noIdentity('c')}
                 ELSE EXISTS (SELECT 1 FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid
                               WHERE t.isleaf AND l.relkind = 'r' AND ${noIdentity('l')}) END AS keyless,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
              OR pg_has_role(current_user, c.relowner, 'USAGE') AS owned
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND ${USER_TABLE}
        AND (CASE WHEN cardinality($1::text[]) = 0 THEN NOT c.relispartition
                  ELSE c.oid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) AS t) END)
      ORDER BY 1`,
    [tables],
  );
  return result.rows;
}

/** Published tables (now) that PostgreSQL refuses UPDATE and DELETE on. */
export async function tablesWithoutIdentity(
  client: pg.Client,
  publication: string,
): Promise<string[]> {
  const result = await client.query<{ name: string }>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS name
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r' AND ${USER_TABLE} AND ${noIdentity('c')}
        AND EXISTS (
              SELECT 1 FROM pg_publication_tables pt
               WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
      ORDER BY 1`,
    [publication],
  );
  return result.rows.map((r) => r.name);
}

/** A few names and how many more: error lines stay one line. */
export function someOf(names: readonly string[], shown = 5): string {
  return (
    names.slice(0, shown).join(', ') +
    (names.length > shown ? ` and ${names.length - shown} more` : '')
  );
}

export interface PublicationPlan {
  /** What CREATE PUBLICATION names: every table, or these (none: an empty one, kept current). */
  readonly target: 'all' | readonly string[];
  /** Tables to give REPLICA IDENTITY FULL first (identity_full). */
  readonly identityFull: readonly string[];
  /** Covered tables without a replica identity (published under accept, left out under leave_out). */
  readonly keyless: readonly string[];
  /** Why Philotes must not create it (block; identity_full on tables the role does not own). */
  readonly refusal: string | null;
}

/** What a publication Philotes creates now would be, by `keylessTables`; nothing is changed. */
export async function planPublication(
  client: pg.Client,
  source: SourceConfig,
): Promise<PublicationPlan> {
  const covered = await coveredTables(client, source.tables);
  const keyless = covered.filter((t) => t.keyless);
  const names = keyless.map((t) => t.name);
  const configured = source.tables.length === 0 ? 'all' : covered.map((t) => t.name);
  const base = { target: configured, identityFull: [], keyless: names, refusal: null } as const;
  if (keyless.length === 0) return base;
  const wouldFail = `${keyless.length} table(s) without a replica identity (no primary key): ${someOf(names)}; PostgreSQL would then refuse the application's UPDATE and DELETE on them`;
  switch (source.keylessTables) {
    case 'block':
      return {
        ...base,
        refusal: `publication "${source.publication}" is not created: it would publish ${wouldFail}`,
      };
    case 'leave_out':
      return { ...base, target: covered.filter((t) => !t.keyless).map((t) => t.name) };
    case 'identity_full': {
      const notOwned = keyless.filter((t) => !t.owned).map((t) => t.name);
      if (notOwned.length > 0)
        return {
          ...base,
          refusal: `publication "${source.publication}" is not created: keylessTables is identity_full, but ${source.connection.user} does not own ${someOf(notOwned)}, so cannot give them REPLICA IDENTITY FULL`,
        };
      return { ...base, identityFull: names };
    }
    case 'accept':
      return base;
  }
}

function quoted(client: pg.Client, name: string): string {
  // Names from coveredTables are already quoted by format(%I.%I); the configured ones are
  // schema.table as the configuration checks them (no dots inside a part).
  return name.includes('"')
    ? name
    : name
        .split('.')
        .map((part) => client.escapeIdentifier(part))
        .join('.');
}

/**
 * Creates the publication as `planPublication` says (or stops the source with its refusal).
 * Returns false when another process created it meanwhile.
 */
export async function createPublication(
  client: pg.Client,
  source: SourceConfig,
  log: Logger,
): Promise<boolean> {
  const plan = await planPublication(client, source);
  if (plan.refusal !== null)
    throw new FatalSourceError(
      `${plan.refusal} (fix: ${policyOf('KEYLESS_TABLES').fix(source)})`,
      'KEYLESS_TABLES',
      { tables: someOf(plan.keyless, 50), count: plan.keyless.length },
    );
  for (const table of plan.identityFull) {
    await ddl(client, `ALTER TABLE ${quoted(client, table)} REPLICA IDENTITY FULL`).catch(
      (error: unknown) => {
        if ((error as { code?: string }).code !== '42501') throw error;
        throw new FatalSourceError(
          `cannot give ${table} REPLICA IDENTITY FULL on ${where(source)}: ${(error as Error).message} (fix: ${policyOf('KEYLESS_TABLES').fix(source)})`,
          'KEYLESS_TABLES',
        );
      },
    );
    log.warn({ table }, 'gave the table REPLICA IDENTITY FULL (keylessTables: identity_full)');
  }
  const target =
    plan.target === 'all'
      ? ' FOR ALL TABLES'
      : plan.target.length === 0
        ? ''
        : ` FOR TABLE ${plan.target.map((t) => quoted(client, t)).join(', ')}`;
  // A partitioned table's changes under its own name rather than each partition's: what a
  // consumer rebuilding the table wants, and steady when partitions come and go (PG 13+).
  const version = Number(
    (await client.query<{ v: string }>(`SELECT current_setting('server_version_num') AS v`)).rows[0]
      ?.v,
  );
  const options =
    source.partitionRoot && supports(version, 'publishViaPartitionRoot')
      ? ' WITH (publish_via_partition_root = true)'
      : '';
  const name = client.escapeIdentifier(source.publication);
  const comment = `${MANAGED_PREFIX} for source ${source.id} (keylessTables: ${source.keylessTables})`;
  try {
    // One transaction: a publication without its comment would be taken for the user's.
    await client.query('BEGIN');
    await client.query(`CREATE PUBLICATION ${name}${target}${options}`);
    await client.query(`COMMENT ON PUBLICATION ${name} IS ${client.escapeLiteral(comment)}`);
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    const code = (error as { code?: string }).code;
    if (code === '42710') return false; // created concurrently
    if (code === '42501') {
      throw new FatalSourceError(
        `cannot create publication "${source.publication}" on ${where(source)}: ${(error as Error).message} (fix: ${policyOf('NO_PRIVILEGE').fix(source)})`,
        'NO_PRIVILEGE',
      );
    }
    if (code === '42P01') {
      throw new FatalSourceError(
        `cannot create publication "${source.publication}" on ${where(source)}: ${(error as Error).message} (fix: ${policyOf('TABLE_MISSING').fix(source)})`,
        'TABLE_MISSING',
      );
    }
    throw error;
  }
  if (plan.keyless.length > 0 && source.keylessTables === 'accept')
    log.warn(
      { publication: source.publication, tables: plan.keyless.slice(0, 50) },
      `published ${plan.keyless.length} table(s) without a replica identity (keylessTables: accept): UPDATE and DELETE on them fail on the source`,
    );
  if (plan.keyless.length > 0 && source.keylessTables === 'leave_out')
    log.warn(
      { publication: source.publication, tables: plan.keyless.slice(0, 50) },
      `left out ${plan.keyless.length} table(s) without a replica identity (keylessTables: leave_out): their changes are not captured`,
    );
  log.info(
    {
      publication: source.publication,
      target: target.trim() || 'no tables yet',
      options,
      keylessTables: source.keylessTables,
    },
    'publication created',
  );
  return true;
}

/** DDL under a lock timeout, in a transaction of its own. */
async function ddl(client: pg.Client, sql: string): Promise<void> {
  try {
    await client.query('BEGIN');
    await client.query(`SET LOCAL lock_timeout = '${DDL_LOCK_TIMEOUT}'`);
    await client.query(sql);
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
}

export interface PublicationState {
  readonly exists: boolean;
  /** Philotes created it (its comment says so), and so keeps it. */
  readonly managed: boolean;
  readonly allTables: boolean;
  /** Tables listed in it (FOR TABLE), quoted; empty for FOR ALL TABLES. */
  readonly listed: readonly string[];
}

export async function readPublication(
  client: pg.Client,
  publication: string,
): Promise<PublicationState> {
  const result = await client.query<{
    all: boolean;
    comment: string | null;
    listed: string[];
  }>(
    `SELECT p.puballtables AS all, obj_description(p.oid, 'pg_publication') AS comment,
            ARRAY(SELECT format('%I.%I', n.nspname, c.relname)
                    FROM pg_publication_rel r JOIN pg_class c ON c.oid = r.prrelid
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE r.prpubid = p.oid ORDER BY 1) AS listed
       FROM pg_publication p WHERE p.pubname = $1`,
    [publication],
  );
  const row = result.rows[0];
  if (row === undefined) return { exists: false, managed: false, allTables: false, listed: [] };
  return {
    exists: true,
    managed: row.comment?.startsWith(MANAGED_PREFIX) ?? false,
    allTables: row.all,
    listed: row.listed,
  };
}

/** What the keeper would change in a publication Philotes made, by `keylessTables`. */
export interface KeepingPlan {
  /** Tables to add (leave_out): each gets a snapshot asked for before it is added. */
  readonly add: readonly string[];
  /** Published tables that lost their replica identity, to drop (leave_out). */
  readonly drop: readonly string[];
  /** Published tables without a replica identity to give REPLICA IDENTITY FULL (identity_full). */
  readonly identityFull: readonly string[];
  /**
   * Published tables without a replica identity that stay so (block, accept, a FOR ALL TABLES
   * publication under leave_out, or tables identity_full may not alter): their UPDATE and DELETE
   * fail on the source, which an operator must hear about.
   */
  readonly failing: readonly string[];
  /** Philotes made the publication (its comment says so); the user's own is only told of. */
  readonly managed: boolean;
}

const NOTHING: KeepingPlan = { add: [], drop: [], identityFull: [], failing: [], managed: true };

/**
 * Null for a missing publication. The user's own is never changed: only its failing tables are
 * told of.
 */
export async function planKeeping(
  client: pg.Client,
  source: SourceConfig,
): Promise<KeepingPlan | null> {
  const state = await readPublication(client, source.publication);
  if (!state.exists) return null;
  const published = await tablesWithoutIdentity(client, source.publication);
  if (!state.managed) return { ...NOTHING, failing: published, managed: false };
  const mode: KeylessTables = source.keylessTables;
  if (mode === 'leave_out' && !state.allTables) {
    const covered = await coveredTables(client, source.tables);
    const listed = new Set(state.listed);
    const keyless = new Set(covered.filter((t) => t.keyless).map((t) => t.name));
    return {
      ...NOTHING,
      add: covered.filter((t) => !t.keyless && !listed.has(t.name)).map((t) => t.name),
      // A listed table that lost its identity, or a partitioned one that gained a keyless
      // partition (its UPDATE fails through the root too).
      drop: state.listed.filter((t) => keyless.has(t) || published.includes(t)),
    };
  }
  if (mode === 'identity_full' && published.length > 0) {
    const owned = new Set(
      (await coveredTables(client, published)).filter((t) => t.owned).map((t) => t.name),
    );
    return {
      ...NOTHING,
      identityFull: published.filter((t) => owned.has(t)),
      failing: published.filter((t) => !owned.has(t)),
    };
  }
  return { ...NOTHING, failing: published };
}

/** What the keeper did. */
export interface Kept {
  readonly added: readonly string[];
  readonly dropped: readonly string[];
  readonly identityFull: readonly string[];
  /** Statements the role may not run (it does not own the table), with PostgreSQL's words. */
  readonly refused: ReadonlyArray<{ readonly table: string; readonly error: string }>;
}

/**
 * Carries out a keeping plan, a statement at a time: a table dropped meanwhile is skipped, a lock
 * not had in time is left for the next round.
 */
export async function applyKeeping(
  client: pg.Client,
  source: SourceConfig,
  plan: KeepingPlan,
  log: Logger,
): Promise<Kept> {
  const name = client.escapeIdentifier(source.publication);
  const done = {
    added: [] as string[],
    dropped: [] as string[],
    identityFull: [] as string[],
    refused: [] as Array<{ table: string; error: string }>,
  };
  const attempt = async (sql: string, table: string, into: string[]): Promise<void> => {
    try {
      await ddl(client, sql);
      into.push(table);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === '42501') {
        done.refused.push({ table, error: (error as Error).message });
        return;
      }
      // Dropped meanwhile, or already as wanted: nothing to do.
      if (code === '42P01' || code === '42710' || code === '42704') return;
      if (code === '55P03') {
        log.info({ table, sql }, 'the table was busy; trying again on the next round');
        return;
      }
      throw error;
    }
  };
  for (const t of plan.add)
    await attempt(`ALTER PUBLICATION ${name} ADD TABLE ${quoted(client, t)}`, t, done.added);
  for (const t of plan.drop)
    await attempt(`ALTER PUBLICATION ${name} DROP TABLE ${quoted(client, t)}`, t, done.dropped);
  for (const t of plan.identityFull)
    await attempt(`ALTER TABLE ${quoted(client, t)} REPLICA IDENTITY FULL`, t, done.identityFull);
  return done;
}
