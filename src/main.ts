#!/usr/bin/env node
/**
 * philotes-worker: reads configuration, starts one reader thread per source, then loads and runs
 * the rest (run.ts) until SIGTERM/SIGINT. Exit codes: 0 after a clean stop, 2 for configuration
 * or source errors a person must fix, 1 for anything else.
 *
 * Only light modules are imported statically: the reader threads start loading theirs on another
 * core while this thread loads the supervisor's (pino, prom-client, pg) and opens the buffer.
 */
import { ConfigError, loadConfig, type Config } from './config.js';
import { die, EXIT_ERROR, EXIT_USAGE, oneLine } from './exit.js';
import { createReaderPool } from './reader-pool.js';

async function main(): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (error) {
    if (error instanceof ConfigError) die(EXIT_USAGE, error.message);
    throw error;
  }
  const pool = createReaderPool(config.sources.length);
  const { run } = await import('./run.js');
  await run(config, pool);
}

main().catch((error: unknown) => {
  process.stderr.write(
    `philotes: ${oneLine(error instanceof Error ? error.message : String(error))}\n`,
  );
  process.exit(EXIT_ERROR);
});
