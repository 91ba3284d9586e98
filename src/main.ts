#!/usr/bin/env node
/**
 * philotes-worker: the command line. `run` (the default) reads configuration, starts one reader
 * thread per source, then loads and runs the rest (run.ts) until SIGTERM/SIGINT. `reset-source`
 * records a gap an operator accepts and lets a stopped source resume. `check`,
 * `status` and `print-config` read and print, changing nothing.
 *
 * Exit codes: 0 after a clean stop, 2 for configuration or source errors a person must fix (and
 * for a bad command line), 1 for anything else (for `status`: something could not be read).
 *
 * Only light modules are imported statically: the reader threads start loading theirs on another
 * core while this thread loads the supervisor's (pino, prom-client, pg) and opens the buffer.
 */
import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { closest } from './common/closest.js';
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
  snapshot?: boolean;
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
        ...(opts.snapshot === true ? { snapshot: 'on_demand' as const } : {}),
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

/** `snapshot`: asks the running Philotes to copy chosen tables again (see snapshot-command.ts). */
async function snapshot(opts: { source: string; table?: string[] }): Promise<void> {
  const loaded = config();
  const [{ requestSnapshot, SnapshotCommandError }, { createLogger }, { isFatal }] =
    await Promise.all([
      import('./snapshot-command.js'),
      import('./common/logger.js'),
      import('./common/errors.js'),
    ]);
  const log = createLogger(loaded.logLevel === 'info' ? 'warn' : loaded.logLevel, {}, 2);
  try {
    process.exit(
      await requestSnapshot(
        loaded,
        { sourceId: opts.source, tables: opts.table ?? [] },
        log,
        (line) => process.stdout.write(`${line}\n`),
      ),
    );
  } catch (error) {
    if (error instanceof SnapshotCommandError) die(error.exitCode, error.message);
    die(isFatal(error) ? EXIT_USAGE : EXIT_ERROR, (error as Error).message);
  }
}

/**
 * `ddl-trigger`: installs or upgrades DDL capture on a source, prints its SQL for a superuser to
 * run, or removes it. The reader installs it by itself when its role may; this is for a role
 * that may not, and for removing it once a source no longer captures DDL.
 */
async function ddlTrigger(opts: {
  source?: string;
  print?: boolean;
  remove?: boolean;
}): Promise<void> {
  const capture = await import('./common/ddl-capture.js');
  if (opts.print) {
    const sql = opts.remove ? capture.ddlTriggerRemoveSql() : capture.ddlTriggerInstallSql();
    process.stdout.write(`BEGIN;\n${sql}\nCOMMIT;\n`);
    return;
  }
  if (opts.source === undefined) die(EXIT_USAGE, 'ddl-trigger needs --source <id> (or --print)');
  const loaded = config();
  const source = loaded.sources.find((s) => s.id === opts.source);
  if (!source) {
    const { unknownSource } = await import('./cli-output.js');
    die(EXIT_USAGE, unknownSource(loaded, opts.source));
  }
  const { connectSource } = await import('./source-connection.js');
  const client = await connectSource(source).catch((error: unknown) =>
    die(EXIT_ERROR, (error as Error).message),
  );
  try {
    if (opts.remove) {
      await capture.removeDdlTrigger(client);
      process.stdout.write(`DDL capture removed from source "${source.id}"\n`);
    } else {
      const state = await capture.readDdlTriggerState(client);
      if (!state.canInstall && !capture.ddlTriggerCurrent(state))
        die(
          EXIT_ERROR,
          `the role of source "${source.id}" cannot create event triggers (a superuser can): pipe \`philotes-worker ddl-trigger --print\` into psql as a superuser`,
        );
      if (capture.ddlTriggerCurrent(state))
        process.stdout.write(
          `DDL capture on source "${source.id}" is current (version ${state.version})\n`,
        );
      else {
        await capture.installDdlTrigger(client);
        process.stdout.write(
          `DDL capture installed on source "${source.id}" (version ${capture.DDL_TRIGGER_VERSION})\n`,
        );
      }
    }
  } catch (error) {
    die(EXIT_ERROR, (error as Error).message);
  } finally {
    await client.end().catch(() => undefined);
  }
}

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
  const loaded = config();
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(redacted(loaded), null, 2)}\n`);
    return;
  }
  const { createRequire } = await import('node:module');
  const yaml = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  process.stdout.write(yaml.stringify(redacted(loaded)));
}

async function status(opts: { json?: boolean }): Promise<void> {
  const loaded = config();
  const [{ readStatus }, { formatTable, humanBytes, humanSeconds }] = await Promise.all([
    import('./status.js'),
    import('./cli-output.js'),
  ]);
  const report = await readStatus(loaded);
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    const slot = (s: (typeof report.sources)[number]): string | null =>
      s.slotExists === null
        ? null
        : !s.slotExists
          ? 'missing'
          : s.slotActive
            ? `active: ${s.slotOwner ?? '?'}`
            : 'inactive';
    process.stdout.write(
      `${formatTable(
        [
          'SOURCE',
          'CHECKPOINT',
          'STORED',
          'LAG',
          'RETAINED WAL',
          'WAL STATUS',
          'SLOT',
          'SNAPSHOT',
          'PROBLEM',
        ],
        report.sources.map((s) => [
          s.source,
          s.checkpointLsn,
          s.checkpointAgeSeconds === null ? null : `${humanSeconds(s.checkpointAgeSeconds)} ago`,
          humanBytes(s.lagBytes),
          humanBytes(s.retainedWalBytes),
          s.walStatus,
          slot(s),
          s.snapshot === null
            ? null
            : `#${s.snapshot.id} ${s.snapshot.reason} ${s.snapshot.state}, ${s.snapshot.rows} rows`,
          s.problem,
        ]),
      )}\n`,
    );
  }
  // 1: something could not be read (a source, the buffer); the rows say what.
  process.exit(
    report.buffer !== null || report.sources.some((s) => s.problem) ? EXIT_ERROR : EXIT_OK,
  );
}

async function check(opts: { json?: boolean }): Promise<void> {
  const loaded = config();
  const [{ runChecks, exitCode }, { formatTable }] = await Promise.all([
    import('./check.js'),
    import('./cli-output.js'),
  ]);
  const findings = await runChecks(loaded);
  const code = exitCode(findings);
  if (opts.json) {
    process.stdout.write(`${JSON.stringify({ exitCode: code, findings }, null, 2)}\n`);
  } else {
    process.stdout.write(
      `${formatTable(
        ['TARGET', 'CHECK', 'RESULT', 'DETAIL'],
        findings.map((f) => [
          f.target,
          f.check,
          f.verdict.toUpperCase(),
          f.fix ? `${f.detail} -> fix: ${f.fix}` : f.detail,
        ]),
      )}\n`,
    );
    const blockers = findings.filter((f) => f.verdict === 'blocker').length;
    const warnings = findings.filter((f) => f.verdict === 'warning').length;
    process.stdout.write(
      `\n${blockers} blocker(s), ${warnings} warning(s): ${code === 0 ? 'ready to run' : code === 1 ? 'runs, but look at the warnings' : 'fix the blockers first'}\n`,
    );
  }
  process.exit(code);
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

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
  .option(
    '--snapshot',
    'with the gap, begin a snapshot of every published table, so that the buffer rebuilds the tables despite the gap',
  )
  .action(resetSource);

program
  .command('snapshot')
  .description(
    'copy chosen tables of a source again (every published table without --table) while it streams: the request goes into the buffer and the running Philotes capturing the source begins it within seconds; rows land as SNAPSHOT events between watermarks, as in the initial snapshot',
  )
  .requiredOption('--source <id>', 'the source id (PHILOTES_CDC_SOURCE_ID)')
  .option('--table <name...>', 'a published table, schema.table (or table for public); repeatable')
  .action(snapshot);

program
  .command('check')
  .description(
    'preflight the buffer and every configured source without changing anything (no migration, slot or publication is created): connection, wal_level, REPLICATION, free slots and WAL senders, the slot and the WAL it retains, continuity with the buffer, the publication and its tables, replica identities, the buffer schema and privileges; exit 0 ok, 1 warnings, 2 blockers',
  )
  .option('--json', 'one JSON document instead of a table')
  .action(check);

program
  .command('status')
  .description(
    'every configured source now: its checkpoint and when it was stored, lag, the WAL its slot retains, wal_status, and who holds the slot; read from the buffer and the sources, changing nothing (exit 1 if something could not be read)',
  )
  .option('--json', 'one JSON document instead of a table')
  .action(status);

program
  .command('ddl-trigger')
  .description(
    "install or upgrade the event trigger that captures a source's DDL (sources with ddl: true; the reader does this itself when its role is a superuser), print its SQL for a superuser, or remove it",
  )
  .option('--source <id>', 'the source id (PHILOTES_CDC_SOURCE_ID)')
  .option('--print', 'print the SQL instead of running it (no connection)')
  .option('--remove', 'remove the trigger and its function (with --print: print that SQL)')
  .action(ddlTrigger);

program
  .command('print-config')
  .description('the effective configuration (defaults applied, secrets hidden), as YAML')
  .option('--json', 'as JSON')
  .action(printConfig);

rejectUnknownCommand(program, process.argv.slice(2));

program.parseAsync(process.argv).catch((error: unknown) => {
  process.stderr.write(
    `philotes: ${oneLine(error instanceof Error ? error.message : String(error))}\n`,
  );
  process.exit(EXIT_ERROR);
});
