/**
 * DDL capture on a source: an event trigger that writes every DDL command as a transactional
 * logical message, so it reaches the slot in its transaction, in order with the rows around it.
 * pgoutput carries no DDL itself; a message written inside the command's transaction is the one
 * way to get it into the stream at its exact place (pgstream and pglogical do the same).
 *
 * Shared by the reader (installs or upgrades the trigger when a source has `ddl: true`), `check`
 * (reports its state) and the `ddl-trigger` command (install, print, remove).
 */
import type pg from 'pg';

/** The prefix of the messages the trigger writes; the reader turns them into DDL events. */
export const DDL_MESSAGE_PREFIX = 'philotes.ddl';
/** Bumped whenever the function's body changes: an older installed one is replaced. */
export const DDL_TRIGGER_VERSION = 2;
const COMMENT_PREFIX = 'Philotes DDL capture, version ';
const SCHEMA = 'philotes';
const TRIGGERS = ['philotes_ddl_command_end', 'philotes_sql_drop'] as const;
const INSTALLED_PREFIX = 'Philotes DDL capture installed at ';

/**
 * The function, in plpgsql:
 * - sql_drop lists the objects a statement drops; ddl_command_end, which follows it, cannot see
 *   them, so they wait in a transaction-local setting and go out with the statement's one
 *   message.
 * - Temporary objects are left out: they are private to a session and never replicated.
 * - Each command names the table it made or changed, with that table's shape right after it,
 *   read from the catalog inside the transaction: the shape at this point of the stream.
 * - Reading the catalog cannot fail the DDL: an error there is a WARNING and the command goes
 *   uncaptured. Writing the message needs nothing from Philotes (not its process, nor a slot),
 *   so Philotes being down never breaks the application's migrations. SECURITY DEFINER: every
 *   role's DDL is captured with the owner's (a superuser's) right to write messages.
 */
const FUNCTION_SQL = `
CREATE OR REPLACE FUNCTION ${SCHEMA}.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $philotes$
DECLARE
  commands jsonb;
  dropped jsonb;
BEGIN
  -- Reading the catalog may fail in ways we cannot foresee; that only skips the capture. The
  -- message itself is written outside this block: a message written in a subtransaction can
  -- reach the stream after changes that followed it (seen on PostgreSQL 15).
  BEGIN
    IF TG_EVENT = 'sql_drop' THEN
      PERFORM set_config('philotes.ddl_dropped', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                 'object_type', d.object_type, 'schema', d.schema_name, 'name', d.object_name,
                 'identity', d.object_identity, 'original', d.original))
          FROM pg_event_trigger_dropped_objects() d
         WHERE NOT d.is_temporary), '[]')::text, true);
      RETURN;
    END IF;
    dropped := coalesce(nullif(current_setting('philotes.ddl_dropped', true), ''), '[]')::jsonb;
    PERFORM set_config('philotes.ddl_dropped', '', true);
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'command_tag', c.command_tag, 'object_type', c.object_type, 'schema', c.schema_name,
             'identity', c.object_identity, 'table', (
               SELECT jsonb_build_object(
                        'schema', n.nspname, 'name', r.relname,
                        'columns', coalesce((
                          SELECT jsonb_agg(jsonb_build_object(
                                   'name', a.attname,
                                   'type', format_type(a.atttypid, a.atttypmod),
                                   'not_null', a.attnotnull,
                                   'default', pg_get_expr(ad.adbin, ad.adrelid)) ORDER BY a.attnum)
                            FROM pg_attribute a
                            LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                           WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'),
                        'primary_key', coalesce((
                          SELECT jsonb_agg(a.attname ORDER BY k.ord)
                            FROM pg_index i
                            CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                           WHERE i.indrelid = r.oid AND i.indisprimary), '[]'))
                 FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                WHERE r.relkind IN ('r', 'p')
                  AND r.oid = CASE WHEN c.object_type = 'index'
                                   THEN (SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = c.objid)
                                   ELSE c.objid END
                  AND c.classid = 'pg_class'::regclass)) ORDER BY ordinality), '[]')
      INTO commands
      FROM pg_event_trigger_ddl_commands() WITH ORDINALITY c
     WHERE c.schema_name IS DISTINCT FROM 'pg_temp';
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'Philotes did not capture this DDL command: %', SQLERRM;
    RETURN;
  END;
  IF commands = '[]' AND dropped = '[]' THEN
    RETURN; -- only temporary objects
  END IF;
  PERFORM pg_logical_emit_message(true, '${DDL_MESSAGE_PREFIX}', jsonb_build_object(
    'version', ${DDL_TRIGGER_VERSION}, 'command_tag', TG_TAG, 'statement', current_query(),
    'role', session_user, 'commands', commands, 'dropped', dropped)::text);
END
$philotes$;
COMMENT ON FUNCTION ${SCHEMA}.capture_ddl() IS '${COMMENT_PREFIX}${DDL_TRIGGER_VERSION}';
`;

/** The SQL that installs (or upgrades) DDL capture; a superuser runs it, once per database. */
export function ddlTriggerInstallSql(): string {
  return [
    // What it replaces, for the record below: a capture that was missing or disabled may have
    // let DDL through uncaptured (an upgrade of a working one did not).
    `DO $philotes$ BEGIN PERFORM set_config('philotes.ddl_replacing', (
       SELECT CASE WHEN count(*) = 0 THEN 'missing'
                   WHEN count(*) = ${TRIGGERS.length} AND bool_and(evtenabled <> 'D') THEN 'present'
                   ELSE 'disabled' END
         FROM pg_event_trigger WHERE evtname IN (${TRIGGERS.map((t) => `'${t}'`).join(', ')})), false); END $philotes$;`,
    `CREATE SCHEMA IF NOT EXISTS ${SCHEMA};`,
    FUNCTION_SQL.trim(),
    ...TRIGGERS.map((name) => `DROP EVENT TRIGGER IF EXISTS ${name};`),
    `CREATE EVENT TRIGGER ${TRIGGERS[0]} ON ddl_command_end EXECUTE FUNCTION ${SCHEMA}.capture_ddl();`,
    `CREATE EVENT TRIGGER ${TRIGGERS[1]} ON sql_drop EXECUTE FUNCTION ${SCHEMA}.capture_ddl();`,
    // Also under session_replication_role = replica (some migration and restore tools set it).
    ...TRIGGERS.map((name) => `ALTER EVENT TRIGGER ${name} ENABLE ALWAYS;`),
    // Where capture (re)starts in the WAL: a Philotes whose checkpoint is behind it knows that
    // DDL from its checkpoint to here may be missing, and records that in cdc_gaps.
    `DO $philotes$ BEGIN EXECUTE format('COMMENT ON EVENT TRIGGER ${TRIGGERS[0]} IS %L',
       '${INSTALLED_PREFIX}' || pg_current_wal_lsn() || ' replacing ' || current_setting('philotes.ddl_replacing')); END $philotes$;`,
  ].join('\n');
}

export function ddlTriggerRemoveSql(): string {
  return [
    ...TRIGGERS.map((name) => `DROP EVENT TRIGGER IF EXISTS ${name};`),
    `DROP FUNCTION IF EXISTS ${SCHEMA}.capture_ddl();`,
    // RESTRICT: the schema goes only if nothing else was put in it.
    `DROP SCHEMA IF EXISTS ${SCHEMA} RESTRICT;`,
  ].join('\n');
}

export interface DdlTriggerState {
  /** The installed function's version; null when it is missing. */
  readonly version: number | null;
  /** Both event triggers exist and fire. */
  readonly triggersEnabled: boolean;
  /** The connected role may install it (event triggers need a superuser). */
  readonly canInstall: boolean;
  /**
   * Where the installed capture began, when it replaced a missing or disabled one (its install
   * wrote that down): DDL before it may not have been captured. Null otherwise, or unknown.
   */
  readonly restartedAt: string | null;
}

export async function readDdlTriggerState(
  client: pg.Client | pg.PoolClient,
): Promise<DdlTriggerState> {
  const result = await client.query<{
    installed: string | null;
    description: string | null;
    enabled: number;
    superuser: boolean;
  }>(
    `SELECT (SELECT obj_description(e.oid, 'pg_event_trigger') FROM pg_event_trigger e
              WHERE e.evtname = $3) AS installed,
            (SELECT d.description
               FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace AND n.nspname = $1
               LEFT JOIN pg_description d ON d.objoid = p.oid AND d.classoid = 'pg_proc'::regclass
              WHERE p.proname = 'capture_ddl' LIMIT 1) AS description,
            (SELECT count(*)::int FROM pg_event_trigger
              WHERE evtname = ANY($2) AND evtenabled <> 'D') AS enabled,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser`,
    [SCHEMA, TRIGGERS, TRIGGERS[0]],
  );
  const row = result.rows[0]!;
  const match = row.description?.startsWith(COMMENT_PREFIX)
    ? Number(row.description.slice(COMMENT_PREFIX.length))
    : NaN;
  const installed =
    /^Philotes DDL capture installed at ([0-9A-F]+\/[0-9A-F]+) replacing (\w+)$/.exec(
      row.installed ?? '',
    );
  return {
    version: Number.isInteger(match) ? match : null,
    triggersEnabled: row.enabled === TRIGGERS.length,
    canInstall: row.superuser,
    restartedAt: installed && installed[2] !== 'present' ? installed[1]! : null,
  };
}

/** Installed, enabled and at least this Philotes' version (a newer one is kept). */
export function ddlTriggerCurrent(state: DdlTriggerState): boolean {
  return state.version !== null && state.version >= DDL_TRIGGER_VERSION && state.triggersEnabled;
}

/** Installs or upgrades DDL capture in one transaction (several readers may race to do it). */
export async function installDdlTrigger(client: pg.Client | pg.PoolClient): Promise<void> {
  await runInTransaction(client, ddlTriggerInstallSql());
}

export async function removeDdlTrigger(client: pg.Client | pg.PoolClient): Promise<void> {
  await runInTransaction(client, ddlTriggerRemoveSql());
}

async function runInTransaction(client: pg.Client | pg.PoolClient, sql: string): Promise<void> {
  await client.query('BEGIN');
  try {
    // Serializes installs by several readers of one database.
    await client.query(`SELECT pg_advisory_xact_lock(hashtextextended('philotes:ddl-trigger', 0))`);
    await client.query(sql);
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
}
