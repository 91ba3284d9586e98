/**
 * The publication and its tables: it exists or can be created, what it publishes, and the tables
 * whose replica identity or keys limit what Philotes can capture or copy.
 */
import type pg from 'pg';
import type { SourceConfig } from '../../common/config.js';
import {
  publicationExists,
  resetCommand,
  tablesWithoutChunkKey,
  tablesWithoutIdentity,
} from '../../common/source-admin.js';
import type { BufferRecord } from './buffer.js';
import type { AddFinding } from './finding.js';

export async function checkPublication(
  client: pg.Client,
  source: SourceConfig,
  superuser: boolean,
  record: BufferRecord | null,
  add: AddFinding,
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
    await checkSnapshotPrivilege(client, source, record, names, add);
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
  if (missing.length === 0) {
    const published =
      wanted.length > 0
        ? wanted
        : (
            await client.query<{ name: string }>(
              `SELECT format('%I.%I', n.nspname, c.relname) AS name
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
                ORDER BY 1`,
            )
          ).rows.map((r) => r.name);
    await checkSnapshotPrivilege(client, source, record, published, add);
  }
}

/**
 * A snapshot reads the published tables with the source's role: without SELECT on one, the copy
 * fails with permission denied (42501) and the source stops. For a source new to the buffer with
 * `snapshot: initial` or `when_needed` that is its first run, so a blocker; once the buffer holds
 * the source, only a later snapshot (on demand, or when_needed after a lost slot) needs it.
 */
async function checkSnapshotPrivilege(
  client: pg.Client,
  source: SourceConfig,
  record: BufferRecord | null,
  tables: readonly string[],
  add: AddFinding,
): Promise<void> {
  if (tables.length === 0) return;
  const denied = (
    await client.query<{ name: string }>(
      `SELECT t AS name FROM unnest($1::text[]) AS t
        WHERE to_regclass(t) IS NOT NULL AND NOT has_table_privilege(to_regclass(t), 'SELECT')
        ORDER BY 1`,
      [tables],
    )
  ).rows.map((r) => r.name);
  const needed = source.snapshot !== 'never' && record === null;
  if (denied.length === 0) {
    add({
      check: 'snapshot privilege',
      verdict: 'ok',
      detail: `${source.connection.user} may read every published table (SELECT), as a snapshot does`,
      fix: null,
    });
    return;
  }
  const shown =
    denied.slice(0, 5).join(', ') + (denied.length > 5 ? ` and ${denied.length - 5} more` : '');
  add({
    check: 'snapshot privilege',
    verdict: needed ? 'blocker' : 'warning',
    detail: `${source.connection.user} has no SELECT on ${shown}: ${
      needed
        ? `the first run's snapshot (snapshot: ${source.snapshot}) fails with permission denied`
        : 'a snapshot (on demand, or when_needed after a lost slot) would fail with permission denied'
    }`,
    fix: `GRANT SELECT ON ${denied.join(', ')} TO ${source.connection.user}${needed ? ', or snapshot: never for this source' : ''}`,
  });
}

function reportIdentity(tables: readonly string[], add: AddFinding): void {
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
