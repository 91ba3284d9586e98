#!/usr/bin/env node
/**
 * philotes-worker: the command line. This file only wires the commands; each lives in
 * src/commands/ with its definition, action and rendering: `run` (the default: capture until
 * SIGTERM/SIGINT), `reset-source`, `snapshot`, `check`, `status`, `consume`, `partition-buffer`, `ddl-trigger`,
 * `print-config`.
 *
 * Exit codes: 0 after a clean stop, 2 for configuration or source errors a person must fix (and
 * for a bad command line), 1 for anything else (for `status`: something could not be read).
 *
 * Only light modules are imported statically: the reader threads start loading theirs on another
 * core while this thread loads the supervisor's (pino, prom-client, pg) and opens the buffer.
 */
import { Command, CommanderError } from 'commander';
import { closest } from './common/closest.js';
import { registerCheck } from './commands/check.js';
import { registerConsume } from './commands/consume.js';
import { setConfigPath, version } from './commands/cli.js';
import { registerDdlTrigger } from './commands/ddl-trigger.js';
import { EXIT_ERROR, EXIT_OK, EXIT_USAGE, oneLine } from './common/exit.js';
import { registerPartitionBuffer } from './commands/partition-buffer.js';
import { registerPrintConfig } from './commands/print-config.js';
import { registerResetSource } from './commands/reset-source.js';
import { registerRun } from './commands/run.js';
import { registerSnapshot } from './commands/snapshot.js';
import { registerStatus } from './commands/status.js';

/**
 * `run` is the default command, so commander would read a misspelt command as an argument of
 * `run` ("too many arguments"): name the unknown command instead, with the nearest known one.
 */
function rejectUnknownCommand(command: Command, args: readonly string[]): void {
  const known = [...command.commands.map((c) => c.name()), 'help'];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === '--config')
      i++; // its value
    else if (!arg.startsWith('-')) {
      if (known.includes(arg)) return;
      const near = closest(arg, known);
      process.stderr.write(
        `philotes: unknown command "${arg}"${near ? ` (did you mean "${near}"?)` : ''}; the commands are ${known.join(', ')}\n`,
      );
      process.exit(EXIT_USAGE);
    }
  }
}

const program = new Command()
  .name('philotes-worker')
  .description(
    'Change-data-capture for PostgreSQL: logical replication into a buffer database, exactly once. Configuration comes from the environment (one source) or a file (--config, any number of sources); see README.md.',
  )
  // -v as well as --version: what most tools answer to (commander's own short flag is -V).
  .version(version(), '-v, --version')
  .option(
    '--config <path>',
    'a configuration file (YAML or JSON) with any number of sources; or PHILOTES_CONFIG',
  )
  .hook('preAction', (command) => {
    setConfigPath((command.opts() as { config?: string }).config);
  })
  // A hint, not the whole help text under the error.
  .showHelpAfterError('(philotes-worker --help lists the commands and options)')
  // Help and --version exit 0; every other command-line error exits 2, like a bad setting.
  .exitOverride((error: CommanderError) => {
    process.exit(error.exitCode === 0 ? EXIT_OK : EXIT_USAGE);
  });

registerRun(program);
registerResetSource(program);
registerSnapshot(program);
registerCheck(program);
registerConsume(program);
registerStatus(program);
registerDdlTrigger(program);
registerPartitionBuffer(program);
registerPrintConfig(program);

rejectUnknownCommand(program, process.argv.slice(2));

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(
    `philotes: ${oneLine(error instanceof Error ? error.message : String(error))}\n`,
  );
  process.exit(EXIT_ERROR);
});
