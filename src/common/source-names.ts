/** How messages name a source's server and the command past a gap: one spelling everywhere. */
import type { SourceConfig } from './config-types.js';

/** host:port/database, the source's address in every message. */
export function where(source: SourceConfig): string {
  return `${source.connection.host}:${source.connection.port}/${source.connection.database}`;
}

/** The operator command that records a gap and lets capture go on. */
export function resetCommand(sourceId: string, extra = ''): string {
  return `philotes-worker reset-source --source ${sourceId} --accept-gap${extra}`;
}
