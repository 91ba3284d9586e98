/**
 * `philotes-worker partition-buffer`: converts an unpartitioned cdc_events (a buffer from before
 * schema 11, too large for a running Philotes to convert by itself) into partitions, online: the
 * capture goes on storing while it runs. The work and its argument: src/buffer/partitions.ts.
 */
import type { Command } from 'commander';
import { cliConfig, failCommand, print } from './cli.js';
import { EXIT_ERROR, EXIT_OK } from '../common/exit.js';

async function partitionBuffer(): Promise<void> {
  const loaded = cliConfig('consumer');
  const [pg, { pgClientOptions }, partitions, { migrate }] = await Promise.all([
    import('pg'),
    import('../common/pg-connection.js'),
    import('../buffer/partitions.js'),
    import('../buffer/migrations.js'),
  ]);
  const client = new pg.default.Client(pgClientOptions(loaded.buffer, 'philotes:maintenance'));
  client.on('error', () => undefined);
  try {
    await client.connect();
    await migrate(client);
    const lock = await client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1) AS ok', [
      partitions.MAINTENANCE_LOCK_KEY,
    ]);
    if (lock.rows[0]?.ok !== true) {
      print(
        'A running Philotes is maintaining the buffer right now (partitions, retention): try again in a minute.',
      );
      process.exit(EXIT_ERROR);
    }
    const bytes = (await partitions.isPartitioned(client))
      ? null
      : await partitions.eventsTableBytes(client);
    const done = await partitions.partitionEvents(client, loaded);
    const made = await partitions.ensurePartitions(client, loaded);
    if (done === null)
      print(`cdc_events is partitioned already. Partitions made ahead: ${made.length}.`);
    else
      print(
        `cdc_events is partitioned: the old table (${Math.round((bytes ?? 0) / 1048576)} MB) is its first partition, cdc_events_legacy, validated in ${(done.validateMs / 1000).toFixed(1)} s while writes went on; the switch held its lock ${Math.round(done.switchMs)} ms. Nothing was rewritten. Partitions made ahead: ${made.length}. Retention drops cdc_events_legacy once its range has passed and every consumer group has read it.`,
      );
    process.exit(EXIT_OK);
  } catch (error) {
    await failCommand(error);
  } finally {
    await client.end().catch(() => undefined);
  }
}

export function registerPartitionBuffer(program: Command): void {
  program
    .command('partition-buffer')
    .description(
      'convert an unpartitioned cdc_events (a buffer from before schema 11) into partitions by storing time, online: the old table becomes the first partition without being rewritten, and the capture goes on meanwhile (a running Philotes does this by itself for a buffer of up to 64 MB)',
    )
    .action(partitionBuffer);
}
