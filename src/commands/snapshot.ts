/**
 * `philotes-worker snapshot`: asks the running Philotes to copy chosen tables again, through a
 * request in the buffer (the work: snapshot/request.ts).
 */
import type { Command } from 'commander';
import { cliConfig, commandLog, print } from './cli.js';
import { die, EXIT_ERROR, EXIT_USAGE } from '../common/exit.js';

async function snapshot(opts: { source: string; table?: string[] }): Promise<void> {
  const loaded = cliConfig();
  const [{ requestSnapshot, SnapshotCommandError }, { isFatal }, log] = await Promise.all([
    import('./snapshot/request.js'),
    import('../common/errors.js'),
    commandLog(loaded),
  ]);
  try {
    process.exit(
      await requestSnapshot(
        loaded,
        { sourceId: opts.source, tables: opts.table ?? [] },
        log,
        print,
      ),
    );
  } catch (error) {
    if (error instanceof SnapshotCommandError) die(error.exitCode, error.message);
    die(isFatal(error) ? EXIT_USAGE : EXIT_ERROR, (error as Error).message);
  }
}

export function registerSnapshot(program: Command): void {
  program
    .command('snapshot')
    .description(
      'copy chosen tables of a source again (every published table without --table) while it streams: the request goes into the buffer and the running Philotes capturing the source begins it within seconds; rows land as SNAPSHOT events between watermarks, as in the initial snapshot',
    )
    .requiredOption('--source <id>', 'the source id (PHILOTES_CDC_SOURCE_ID)')
    .option(
      '--table <name...>',
      'a published table, schema.table (or table for public); repeatable',
    )
    .action(snapshot);
}
