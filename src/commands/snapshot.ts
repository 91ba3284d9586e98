/**
 * `philotes-worker snapshot`: asks the running Philotes to copy chosen tables again, through a
 * request in the buffer (the work: snapshot/request.ts).
 */
import type { Command } from 'commander';
import { cliConfig, commandLog, failCommand, print } from './cli.js';

async function snapshot(opts: { source: string; table?: string[] }): Promise<void> {
  const loaded = cliConfig();
  const [{ requestSnapshot }, log] = await Promise.all([
    import('./snapshot/request.js'),
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
    await failCommand(error);
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
