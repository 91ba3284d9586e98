/** `philotes-worker print-config`: the effective configuration, defaults applied, secrets hidden. */
import type { Command } from 'commander';
import type { Config } from '../common/config.js';
import { cliConfig } from './cli.js';

/** A secret-free copy of the configuration: passwords hidden, CA certificates by size. */
function redacted(loaded: Config): unknown {
  return JSON.parse(
    JSON.stringify(loaded, (key, value: unknown) => {
      if (key === 'password') return value === undefined ? undefined : '(set, hidden)';
      if (key === 'sslRootCert' && typeof value === 'string') return `(PEM, ${value.length} bytes)`;
      return value;
    }),
  ) as unknown;
}

async function printConfig(opts: { json?: boolean }): Promise<void> {
  const loaded = cliConfig();
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(redacted(loaded), null, 2)}\n`);
    return;
  }
  const { createRequire } = await import('node:module');
  const yaml = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  process.stdout.write(yaml.stringify(redacted(loaded)));
}

export function registerPrintConfig(program: Command): void {
  program
    .command('print-config')
    .description('the effective configuration (defaults applied, secrets hidden), as YAML')
    .option('--json', 'as JSON')
    .action(printConfig);
}
