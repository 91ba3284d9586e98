/**
 * `philotes-worker reset-source`: accept a gap a stopped source reported, record it, and let the
 * source resume (the work: reset-source/reset.ts). Without --accept-gap it only says what would
 * be recorded.
 */
import type { Command } from 'commander';
import { cliConfig, commandLog, failCommand, print, version } from './cli.js';

async function resetSource(opts: {
  source: string;
  acceptGap?: boolean;
  skipToCurrent?: boolean;
  snapshot?: boolean;
}): Promise<void> {
  const loaded = cliConfig();
  const [{ resetSource: reset }, log] = await Promise.all([
    import('../supervisor/reset-source.js'),
    commandLog(loaded),
  ]);
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
      print,
      version(),
    );
    process.exit(code);
  } catch (error) {
    await failCommand(error);
  }
}

export function registerResetSource(program: Command): void {
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
}
