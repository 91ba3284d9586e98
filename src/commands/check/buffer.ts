/**
 * The buffer: its server version, its schema (migrations applied, or to apply), and what it holds
 * for each source (the record the source checks compare with).
 */
import type { Config } from '../../common/config.js';
import { BUFFER_TABLES } from '../../common/database-identity.js';
import { supports } from '../../common/server-features.js';
import { SCHEMA_VERSION } from '../../buffer/migrations.js';
import {
  readCheckpoints,
  schemaVersion,
  tablesPresent,
  type CheckpointRow,
} from '../../buffer/reads.js';
import { withClient, type Finding } from './finding.js';
import { readSourceStatus, type ReportedStatus } from '../../buffer/source-status.js';

/** What the buffer holds for a source: its checkpoint row. */
export type BufferRecord = CheckpointRow;

export async function checkBuffer(config: Config): Promise<{
  findings: Finding[];
  records: Map<string, BufferRecord> | null;
  reports: Map<string, ReportedStatus[]>;
}> {
  let records: Map<string, BufferRecord> | null = null;
  const reports = new Map<string, ReportedStatus[]>();
  const findings = await withClient('buffer', 'buffer', config.buffer, async (client, add) => {
    const version = Number(
      (await client.query<{ v: string }>(`SELECT current_setting('server_version_num') AS v`))
        .rows[0]?.v,
    );
    if (!supports(version, 'genRandomUuid')) {
      add({
        check: 'version',
        verdict: 'blocker',
        detail: `PostgreSQL ${version}; the buffer needs 13 or later (gen_random_uuid)`,
        fix: 'use a newer server for the buffer',
      });
    }
    const tables = await tablesPresent(client, BUFFER_TABLES);
    const applied = await schemaVersion(client);
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
    records = await readCheckpoints(
      client,
      config.sources.map((s) => s.id),
    );
    for (const source of config.sources)
      reports.set(source.id, await readSourceStatus(client, source.id));
  });
  return { findings, records, reports };
}
