#!/usr/bin/env node
/**
 * philotes-worker: the command line. `run` (the default) reads configuration, starts one reader
 * thread per source, then loads and runs the rest (run.ts) until SIGTERM/SIGINT. `reset-source`
 * records a gap an operator accepts and lets a stopped source resume.
 *
 * Exit codes: 0 after a clean stop, 2 for configuration or source errors a person must fix (and
 * for a bad command line), 1 for anything else.
 *
 * Only light modules are imported statically: the reader threads start loading theirs on another
 * core while this thread loads the supervisor's (pino, prom-client, pg) and opens the buffer.
 */
import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { ConfigError, loadConfig, type Config } from './common/config.js';
import { die, EXIT_ERROR, EXIT_OK, EXIT_USAGE, oneLine } from './exit.js';
import { ReaderThreads } from './supervisor/reader-pool.js';

/** The --config option, if given (it wins over PHILOTES_CONFIG). */
let configPath: string | undefined;

function config(): Config {
  try {
    return loadConfig(process.env, configPath);
  } catch (error) {
    if (error instanceof ConfigError) {
      // Every problem on a line of its own; none of them carries a secret.
      for (const problem of error.problems.slice(0, -1))
        process.stderr.write(`philotes: ${oneLine(problem)}\n`);
      die(EXIT_USAGE, error.problems[error.problems.length - 1] ?? error.message);
    }
    throw error;
  }
}

async function run(): Promise<void> {
  const loaded = config();
  const threads = new ReaderThreads(loaded.sources);
  const { run: runSupervisor } = await import('./run.js');
  await runSupervisor(loaded, threads, version());
}

async function resetSource(opts: {
  source: string;
  acceptGap?: boolean;
  skipToCurrent?: boolean;
}): Promise<void> {
  const loaded = config();
  const [{ resetSource: reset, ResetError }, { createLogger }, { isFatal }] = await Promise.all([
    import('./reset-source.js'),
    import('./common/logger.js'),
    import('./common/errors.js'),
  ]);
  // The report goes to stdout; log lines to stderr.
  const log = createLogger(loaded.logLevel === 'info' ? 'warn' : loaded.logLevel, {}, 2);
  try {
    const code = await reset(
      loaded,
      {
        sourceId: opts.source,
        acceptGap: opts.acceptGap === true,
        skipToCurrent: opts.skipToCurrent === true,
      },
      log,
      (line) => process.stdout.write(`${line}\n`),
    );
    process.exit(code);
  } catch (error) {
    if (error instanceof ResetError) die(error.exitCode, error.message);
    die(isFatal(error) ? EXIT_USAGE : EXIT_ERROR, (error as Error).message);
  }
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

const program = new Command()
  .name('philotes-worker')
  .description(
    'Change-data-capture for PostgreSQL: logical replication into a buffer database, exactly once. Configuration comes from the environment (one source) or a file (--config, any number of sources); see README.md.',
  )
  .version(version())
  .option(
    '--config <path>',
    'a configuration file (YAML or JSON) with any number of sources; or PHILOTES_CONFIG',
  )
  .hook('preAction', (command) => {
    configPath = (command.opts() as { config?: string }).config;
  })
  .showHelpAfterError()
  // Help and --version exit 0; every other command-line error exits 2, like a bad setting.
  .exitOverride((error: CommanderError) => {
    process.exit(error.exitCode === 0 ? EXIT_OK : EXIT_USAGE);
  });

program
  .command('run', { isDefault: true })
  .description('capture every configured source until SIGTERM/SIGINT (the default)')
  .action(run);

program
  .command('reset-source')
  .description(
    'accept a gap a stopped source reported (slot missing, invalidated or advanced by another client, publication missing): record it in cdc_gaps and move the checkpoint past it so capture resumes; without --accept-gap only say what would be recorded',
  )
  .requiredOption('--source <id>', 'the source id (PHILOTES_CDC_SOURCE_ID)')
  .option('--accept-gap', 'record the gap and resume; nothing changes without it')
  .option(
    '--skip-to-current',
    "skip the slot to the source's current WAL position (after a publication was dropped and created again)",
  )
  .action(resetSource);

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(
    `philotes: ${oneLine(error instanceof Error ? error.message : String(error))}\n`,
  );
  process.exit(EXIT_ERROR);
});
