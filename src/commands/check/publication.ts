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
} from '../../common/source-admin.js';
import type { BufferRecord } from './buffer.js';
import type { AddFinding } from './finding.js';
import {
  coveredTables,
  planKeeping,
  planPublication,
  someOf,
  type PublicationPlan,
} from '../../common/publication.js';
import { policyOf } from '../../common/error-policy.js';

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
    await reportKeeping(client, source, add);
    await checkSnapshotPrivilege(client, source, record, names, add);
    if (source.snapshot !== 'never') {
      const keyless = await tablesWithoutChunkKey(client, source.publication);
      if (keyless.length > 0)
        add({
          check: 'snapshot',
          verdict: 'warning',
          detail: `a snapshot cannot copy ${someOf(keyless, 10)}: no primary key and no unique index on NOT NULL columns (their rows are skipped_no_key; their changes are captured)`,
          fix: 'give each a primary key or a unique index on NOT NULL columns (README: Tables without a primary key)',
        });
    }
    return;
  }
  if (record !== null) {
    add({
      check: 'publication',
      verdict: 'blocker',
      code: 'PUBLICATION_MISSING',
      detail: `${name} is missing, but the buffer holds this source's changes: those committed while it was missing cannot be decoded`,
      fix: resetCommand(source, ' --skip-to-current'),
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
  // FOR TABLE needs the role to own every table; leave_out lists them even for all tables.
  const listsTables = wanted.length > 0 || source.keylessTables === 'leave_out';
  const notOwned =
    !listsTables || superuser || missing.length > 0
      ? []
      : (await coveredTables(client, wanted)).filter((t) => !t.owned).map((t) => t.name);
  if (missing.length > 0) {
    add({
      check: 'publication',
      verdict: 'blocker',
      code: 'TABLE_MISSING',
      detail: `${name} would cover ${missing.join(', ')}, which do not exist`,
      fix: 'check the tables setting',
    });
  } else if (!listsTables && !superuser) {
    add({
      check: 'publication',
      verdict: 'blocker',
      code: 'NO_PRIVILEGE',
      detail: `${name} does not exist, and creating it FOR ALL TABLES needs a superuser`,
      fix: `CREATE PUBLICATION ${source.publication} FOR ALL TABLES as a superuser, or list tables the user owns (tables)`,
    });
  } else if (notOwned.length > 0) {
    add({
      check: 'publication',
      verdict: 'blocker',
      code: 'NO_PRIVILEGE',
      detail: `${name} does not exist, and the user does not own ${someOf(notOwned)}`,
      fix: `create the publication as the owner or a superuser`,
    });
  } else {
    // The rule the run applies when it creates it (src/common/publication.ts).
    const plan = await planPublication(client, source);
    if (plan.refusal !== null) {
      add({
        check: 'replica identity',
        verdict: 'blocker',
        code: 'KEYLESS_TABLES',
        detail: plan.refusal,
        fix: policyOf('KEYLESS_TABLES').fix(source),
      });
    } else {
      const what =
        plan.target === 'all'
          ? 'FOR ALL TABLES'
          : plan.target.length === 0
            ? 'with no tables yet'
            : `for ${plan.target.length} table(s)`;
      add({
        check: 'publication',
        verdict: 'ok',
        detail: `${name} does not exist yet: the first start creates it ${what}${source.keylessTables === 'leave_out' ? ', kept current as tables come and go (keylessTables: leave_out)' : ''}`,
        fix: null,
      });
      reportPlannedIdentity(source, plan, add);
    }
  }
  if (missing.length === 0) {
    const published = (await coveredTables(client, wanted)).map((t) => t.name);
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
  const shown = someOf(denied);
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

/** What the keeper finds in an existing publication (the user's is only told of). */
async function reportKeeping(
  client: pg.Client,
  source: SourceConfig,
  add: AddFinding,
): Promise<void> {
  const plan = await planKeeping(client, source);
  const managed = plan?.managed ?? false;
  const failing = plan?.failing ?? [];
  if (plan !== null && plan.identityFull.length > 0)
    add({
      check: 'replica identity',
      verdict: 'ok',
      detail: `${someOf(plan.identityFull)} will get REPLICA IDENTITY FULL at the start (keylessTables: identity_full)`,
      fix: null,
    });
  if (plan !== null && (plan.add.length > 0 || plan.drop.length > 0))
    add({
      check: 'publication',
      verdict: 'ok',
      detail: `the start keeps publication ${source.publication} current (keylessTables: leave_out):${plan.add.length > 0 ? ` adds ${someOf(plan.add)} (after asking for a snapshot of them)` : ''}${plan.drop.length > 0 ? ` drops ${someOf(plan.drop)} (no replica identity any more)` : ''}`,
      fix: null,
    });
  if (failing.length === 0) {
    add({
      check: 'replica identity',
      verdict: 'ok',
      detail: 'every published table has a key or a replica identity',
      fix: null,
    });
    return;
  }
  add({
    check: 'replica identity',
    verdict: 'warning',
    detail: `${failing.length} published table(s) without a primary key or replica identity: ${someOf(failing)}; the source refuses UPDATE and DELETE on them now${managed ? '' : ` (publication ${source.publication} is not Philotes': it is left as it is)`}`,
    fix: managed
      ? `add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, or set keylessTables for source ${source.id}`
      : `add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, or ALTER PUBLICATION ${source.publication} DROP TABLE ...`,
  });
}

/** The replica identity side of a publication the first start will create. */
function reportPlannedIdentity(source: SourceConfig, plan: PublicationPlan, add: AddFinding): void {
  if (plan.keyless.length === 0) {
    add({
      check: 'replica identity',
      verdict: 'ok',
      detail: 'every table it will publish has a key or a replica identity',
      fix: null,
    });
    return;
  }
  const shown = someOf(plan.keyless);
  switch (source.keylessTables) {
    case 'leave_out':
      add({
        check: 'replica identity',
        verdict: 'warning',
        detail: `${plan.keyless.length} table(s) without a replica identity are left out, so their changes are not captured: ${shown}`,
        fix: 'give them a primary key: the running Philotes then adds them (with a snapshot of their rows)',
      });
      return;
    case 'identity_full':
      add({
        check: 'replica identity',
        verdict: 'ok',
        detail: `${shown} will get REPLICA IDENTITY FULL at the first start (keylessTables: identity_full)`,
        fix: null,
      });
      return;
    default:
      add({
        check: 'replica identity',
        verdict: 'warning',
        detail: `${plan.keyless.length} table(s) without a replica identity will be published (keylessTables: accept): the source will refuse UPDATE and DELETE on ${shown}`,
        fix: `give them a primary key, or set keylessTables: leave_out or identity_full for source ${source.id}`,
      });
  }
}
