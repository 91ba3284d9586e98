/**
 * `philotes-worker snapshot --source S [--table T]...`: asks for a re-copy of chosen tables (every
 * published table without --table) while the source streams. The tables are checked against the
 * source's publication here, so that a typo is an error now, not a skipped table later; the
 * request goes into the buffer (philotes_request_snapshot), where the running Philotes that
 * captures the source finds it within seconds and copies the tables between watermarks, as the
 * initial snapshot does.
 */
import type { Config } from './common/config.js';
import type { Logger } from './common/logger.js';
import { connectSource } from './source-connection.js';
import { BufferStore } from './buffer/store.js';
import { unknownSource } from './cli-output.js';
import { EXIT_OK, EXIT_USAGE } from './exit.js';

export class SnapshotCommandError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

/** 'schema.table' as PostgreSQL reads it: unquoted parts fold to lower case; no schema is public. */
export function qualifiedName(name: string): string | null {
  const part = /^(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*))/;
  const parts: string[] = [];
  let rest = name.trim();
  for (;;) {
    const m = part.exec(rest);
    if (!m) return null;
    parts.push(m[1] !== undefined ? m[1].replace(/""/g, '"') : m[2]!.toLowerCase());
    rest = rest.slice(m[0].length);
    if (rest === '') break;
    if (!rest.startsWith('.')) return null;
    rest = rest.slice(1);
  }
  if (parts.length > 2) return null;
  return parts.length === 1 ? `public.${parts[0]}` : `${parts[0]}.${parts[1]}`;
}

export async function requestSnapshot(
  config: Config,
  opts: { sourceId: string; tables: readonly string[] },
  log: Logger,
  out: (line: string) => void,
): Promise<number> {
  const source = config.sources.find((s) => s.id === opts.sourceId);
  if (!source) throw new SnapshotCommandError(unknownSource(config, opts.sourceId), EXIT_USAGE);
  const wanted = opts.tables.map((t) => {
    const q = qualifiedName(t);
    if (q === null)
      throw new SnapshotCommandError(
        `--table ${JSON.stringify(t)} is not a table name (schema.table, or table for public)`,
        EXIT_USAGE,
      );
    return q;
  });

  const client = await connectSource(source);
  let published: string[];
  try {
    const result = await client.query<{ name: string }>(
      `SELECT schemaname || '.' || tablename AS name FROM pg_publication_tables
        WHERE pubname = $1 ORDER BY 1`,
      [source.publication],
    );
    published = result.rows.map((r) => r.name);
  } finally {
    await client.end().catch(() => undefined);
  }
  const missing = wanted.filter((t) => !published.includes(t));
  if (missing.length > 0)
    throw new SnapshotCommandError(
      `not in publication "${source.publication}" of source "${source.id}": ${missing.join(', ')} (it has ${published.length === 0 ? 'no tables' : published.join(', ')})`,
      EXIT_USAGE,
    );

  const store = await BufferStore.open(config.buffer, log, 1);
  try {
    const id = await store.requestSnapshot(
      source.id,
      wanted.length === 0 ? null : [...new Set(wanted)],
    );
    out(
      `snapshot #${id} of ${wanted.length === 0 ? `every table of publication "${source.publication}"` : [...new Set(wanted)].join(', ')} asked for on source "${source.id}": the Philotes process capturing it begins within seconds, after any snapshot before it (progress: /readyz, the status page, cdc_snapshot_tables)`,
    );
    return EXIT_OK;
  } finally {
    await store.close();
  }
}
