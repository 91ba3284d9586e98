/**
 * `philotes-worker run` (the default): capture every configured source until SIGTERM/SIGINT.
 * The reader threads start first, so that they load their modules on another core while this
 * thread loads the supervisor's (run/process.ts) and opens the buffer.
 */
import type { Command } from 'commander';
import { ReaderThreads } from '../supervisor/reader-pool.js';
import { cliConfig, version } from './cli.js';

async function run(): Promise<void> {
  const loaded = cliConfig();
  const threads = new ReaderThreads(loaded.sources);
  const { run: runProcess } = await import('./run/process.js');
  await runProcess(loaded, threads, version());
}

export function registerRun(program: Command): void {
  program
    .command('run', { isDefault: true })
    .description('capture every configured source until SIGTERM/SIGINT (the default)')
    .action(run);
}
