/**
 * `philotes-worker ddl-trigger`: installs or upgrades DDL capture on a source, prints its SQL for
 * a superuser to run, or removes it. The reader installs it by itself when its role may; this is
 * for a role that may not, and for removing it once a source no longer captures DDL.
 */
import type { Command } from 'commander';
import { cliConfig } from './cli.js';
import { die, EXIT_ERROR, EXIT_USAGE } from '../common/exit.js';

async function ddlTrigger(opts: {
  source?: string;
  print?: boolean;
  remove?: boolean;
}): Promise<void> {
  const capture = await import('../common/ddl-capture.js');
  if (opts.print) {
    const sql = opts.remove ? capture.ddlTriggerRemoveSql() : capture.ddlTriggerInstallSql();
    process.stdout.write(`BEGIN;\n${sql}\nCOMMIT;\n`);
    return;
  }
  if (opts.source === undefined) die(EXIT_USAGE, 'ddl-trigger needs --source <id> (or --print)');
  const loaded = cliConfig();
  const source = loaded.sources.find((s) => s.id === opts.source);
  if (!source) {
    const { unknownSource } = await import('../common/closest.js');
    die(EXIT_USAGE, unknownSource(loaded, opts.source));
  }
  const { connectSource } = await import('../common/source-connection.js');
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

export function registerDdlTrigger(program: Command): void {
  program
    .command('ddl-trigger')
    .description(
      "install or upgrade the event trigger that captures a source's DDL (sources with ddl: true; the reader does this itself when its role is a superuser), print its SQL for a superuser, or remove it",
    )
    .option('--source <id>', 'the source id (PHILOTES_CDC_SOURCE_ID)')
    .option('--print', 'print the SQL instead of running it (no connection)')
    .option('--remove', 'remove the trigger and its function (with --print: print that SQL)')
    .action(ddlTrigger);
}
