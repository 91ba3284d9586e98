/**
 * `philotes-worker print-config`: the effective configuration as a file `--config` accepts as
 * it is — every source with every setting (defaults applied), the process-wide settings, and
 * the buffer — with each secret replaced by its reference (the `passwordEnv` variable or the
 * `passwordFile` path it came from). A secret that had no reference (inline in the file, or in a
 * PHILOTES_CDC_* variable, which a file refuses beside it) becomes a `passwordEnv` to set, said in
 * a comment at the top. A buffer read from PHILOTES_BUFFER_* stays there (no `buffer:`), as a
 * file allows. Loading the output with the same environment gives the same configuration
 * (test/unit/print-config.test.ts).
 */
import type { Command } from 'commander';
import type { Config, ConnectionConfig, SourceConfig } from '../common/config.js';
import { formatMs } from '../common/config-fields.js';
import { PROCESS_SETTINGS, SOURCE_SETTINGS } from '../common/config-registry.js';
import { cliConfig } from './cli.js';

export interface PrintedConfig {
  /** The file's content, as YAML or JSON would hold it. */
  readonly document: Record<string, unknown>;
  /** What a person must do for the file to run: variables to set. */
  readonly notes: readonly string[];
}

/** A value as the file writes it: durations in words, the rest as they are. */
function fileValue(key: string, value: unknown): unknown {
  return key.endsWith('Ms') && typeof value === 'number' ? formatMs(value) : value;
}

function variableFor(name: string): string {
  return `${name.toUpperCase().replace(/[^A-Z0-9]+/g, '_')}_PASSWORD`;
}

function connectionKeys(
  conn: ConnectionConfig,
  name: string,
  notes: string[],
): Record<string, unknown> {
  const keys: Record<string, unknown> = {
    host: conn.host,
    port: conn.port,
    database: conn.database,
    user: conn.user,
    sslmode: conn.sslmode,
  };
  if (conn.sslRootCertFile !== undefined) keys['sslRootCert'] = conn.sslRootCertFile;
  if (conn.password === undefined) return keys;
  if (conn.passwordFile !== undefined) keys['passwordFile'] = conn.passwordFile;
  else if (conn.passwordEnv !== undefined) keys['passwordEnv'] = conn.passwordEnv;
  else {
    const variable = variableFor(name);
    keys['passwordEnv'] = variable;
    notes.push(
      `set ${variable} to the password of ${name} (it was given in ${conn.passwordSetting ?? 'the configuration'}; print-config never prints a secret)`,
    );
  }
  return keys;
}

function sourceKeys(source: SourceConfig, notes: string[]): Record<string, unknown> {
  const keys: Record<string, unknown> = { id: source.id, slot: source.slot };
  keys['publication'] = source.publication;
  if (source.tables.length > 0) keys['tables'] = [...source.tables];
  keys['partitionRoot'] = source.partitionRoot;
  if (source.messages.length > 0) keys['messages'] = [...source.messages];
  keys['ddl'] = source.ddl;
  keys['failover'] = source.failover;
  keys['protocol'] = source.protocol ?? 'auto';
  keys['snapshot'] = source.snapshot;
  keys['keylessTables'] = source.keylessTables;
  Object.assign(keys, connectionKeys(source.connection, `source ${source.id}`, notes));
  for (const s of SOURCE_SETTINGS) keys[s.fileKey] = fileValue(s.key, source.settings[s.key]);
  return keys;
}

export function printableConfig(config: Config): PrintedConfig {
  const notes: string[] = [];
  const document: Record<string, unknown> = {};
  if (config.buffer.fromEnvironment)
    notes.push('the buffer comes from the PHILOTES_BUFFER_* variables, as it does now');
  else document['buffer'] = connectionKeys(config.buffer, 'buffer', notes);
  for (const s of PROCESS_SETTINGS)
    document[s.fileKey] = fileValue(s.key, (config as unknown as Record<string, unknown>)[s.key]);
  // The file's defaults, which a configuration keeps (each source below has all of its own).
  document['defaults'] = Object.fromEntries(
    SOURCE_SETTINGS.map((s) => [s.fileKey, fileValue(s.key, config[s.key])]),
  );
  document['sources'] = config.sources.map((s) => sourceKeys(s, notes));
  return { document, notes };
}

async function printConfig(opts: { json?: boolean }): Promise<void> {
  const loaded = cliConfig();
  const { document, notes } = printableConfig(loaded);
  const from = loaded.origin === 'environment' ? 'the environment' : loaded.origin.file;
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(document, null, 2)}\n`);
    for (const note of notes) process.stderr.write(`philotes: to run it, ${note}\n`);
    return;
  }
  const { createRequire } = await import('node:module');
  const yaml = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  const header = [
    `# The effective configuration of ${from}, defaults applied: a file for --config.`,
    '# Secrets appear as references (passwordEnv, passwordFile), never as values.',
    ...notes.map((note) => `# To run it: ${note}.`),
  ];
  process.stdout.write(`${header.join('\n')}\n${yaml.stringify(document)}`);
}

export function registerPrintConfig(program: Command): void {
  program
    .command('print-config')
    .description(
      'the effective configuration (defaults applied) as a file --config accepts, secrets as references',
    )
    .option('--json', 'as JSON')
    .action(printConfig);
}
