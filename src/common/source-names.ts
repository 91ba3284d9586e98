/** How messages name a source's server and the command past a gap: one spelling everywhere. */
import type { SourceConfig } from './config-types.js';

/** host:port/database, the source's address in every message. */
export function where(source: SourceConfig): string {
  return `${source.connection.host}:${source.connection.port}/${source.connection.database}`;
}

/** What a suggested command needs of a source: its id, and the file that configures it. */
export interface SourceRef {
  readonly id: string;
  readonly configFile?: string | undefined;
}

/** A path as a shell reads it back: quoted when it holds anything but plain characters. */
function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, `'\\''`)}'`;
}

/**
 * A philotes-worker command to run for this source, with the `--config` the source came from:
 * a command suggested without it would read another configuration (or none).
 */
export function workerCommand(source: SourceRef, verb: string, args: string): string {
  const config = source.configFile === undefined ? '' : ` --config ${shellWord(source.configFile)}`;
  return `philotes-worker ${verb}${args === '' ? '' : ` ${args}`}${config}`;
}

/**
 * The operator command that records a gap and lets capture go on. `extra` options go before the
 * `--config`, so that the command reads as one.
 */
export function resetCommand(source: SourceRef, extra = ''): string {
  return workerCommand(source, 'reset-source', `--source ${source.id} --accept-gap${extra}`);
}
