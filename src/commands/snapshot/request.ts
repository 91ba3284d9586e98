/**
 * `philotes-worker snapshot --source S [--table T]...`: asks for a re-copy of chosen tables (every
 * published table without --table) while the source streams. The tables are checked against the
 * source's publication here, so that a typo is an error now, not a skipped table later; the
 * request goes into the buffer (philotes_request_snapshot), where the running Philotes that
 * captures the source finds it within seconds and copies the tables between watermarks, as the
 * initial snapshot does.
 */
import type { Config } from '../../common/config.js';
import type { Logger } from '../../common/logger.js';
import { connectSource } from '../../common/source-connection.js';
import { BufferStore } from '../../buffer/store.js';
import { unknownSource } from '../../common/closest.js';
import { CommandError, EXIT_OK, EXIT_USAGE } from '../../common/exit.js';

export class SnapshotCommandError extends CommandError {}

export async function requestSnapshot(
  config: Config,
  opts: { sourceId: string; tables: readonly string[] },
  log: Logger,
  out: (line: string) => void,
): Promise<number> {
  const source = config.sources.find((s) => s.id === opts.sourceId);
  if (!source) throw new SnapshotCommandError(unknownSource(config, opts.sourceId), EXIT_USAGE);
  const client = await connectSource(source);
  let published: string[];
  /** Each name asked for, as given (the buffer parses it again, alike), and as 'schema.table'. */
  const wanted = new Map<string, string>();
  try {
    // Names as PostgreSQL reads them (parse_ident: quotes, case folding; no schema is public),
    // which is how philotes_request_snapshot reads them in the buffer.
    for (const given of opts.tables) {
      const parsed = await client
        .query<{ name: string | null }>(
          `SELECT CASE cardinality(n) WHEN 1 THEN 'public.' || n[1] WHEN 2 THEN n[1] || '.' || n[2] END AS name
             FROM parse_ident($1) AS n`,
          [given],
        )
        .catch((error: unknown) => {
          // invalid_parameter_value: parse_ident's "string is not a valid identifier".
          if ((error as { code?: unknown }).code !== '22023') throw error;
          return { rows: [{ name: null }] };
        });
      const name = parsed.rows[0]?.name ?? null;
      if (name === null)
        throw new SnapshotCommandError(
          `--table ${JSON.stringify(given)} is not a table name (schema.table, or table for public)`,
          EXIT_USAGE,
        );
      if (![...wanted.values()].includes(name)) wanted.set(given, name);
    }
    const result = await client.query<{ name: string }>(
      `SELECT schemaname || '.' || tablename AS name FROM pg_publication_tables
        WHERE pubname = $1 ORDER BY 1`,
      [source.publication],
    );
    published = result.rows.map((r) => r.name);
  } finally {
    await client.end().catch(() => undefined);
  }
  const names = [...wanted.values()];
  const missing = names.filter((t) => !published.includes(t));
  if (missing.length > 0)
    throw new SnapshotCommandError(
      `not in publication "${source.publication}" of source "${source.id}": ${missing.join(', ')} (it has ${published.length === 0 ? 'no tables' : published.join(', ')})`,
      EXIT_USAGE,
    );

  const store = await BufferStore.open(config.buffer, log, 1);
  try {
    const id = await store.requestSnapshot(
      source.id,
      names.length === 0 ? null : [...wanted.keys()],
    );
    out(
      `snapshot #${id} of ${names.length === 0 ? `every table of publication "${source.publication}"` : names.join(', ')} asked for on source "${source.id}": the Philotes process capturing it begins within seconds, after any snapshot before it (progress: /readyz, the status page, cdc_snapshot_tables)`,
    );
    return EXIT_OK;
  } finally {
    await store.close();
  }
}
