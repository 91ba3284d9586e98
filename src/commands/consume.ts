/**
 * `philotes-worker consume`: the reference consumer. A member of a consumer group (several
 * processes of one group share its sources) that prints each batch's records as JSON lines to
 * stdout, or gives each batch to a command on its stdin (--exec), and moves the group's position
 * past the batch once it is written (stdout) or the command exited 0 (--exec). The work:
 * src/consumer/consumer.ts.
 */
import { Option, type Command } from 'commander';
import { cliConfig, commandLog, failCommand, version } from './cli.js';
import { die, EXIT_OK, EXIT_USAGE } from '../common/exit.js';

interface ConsumeOpts {
  group: string;
  source?: string[];
  from: string;
  format: string;
  exec?: string;
  batchSize: string;
  pollInterval: string;
  listen: boolean;
}

const LSN = /^[0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}$/;

async function consumeCommand(opts: ConsumeOpts): Promise<void> {
  const loaded = cliConfig('consumer');
  const from =
    opts.from === 'earliest' || opts.from === 'latest'
      ? opts.from
      : LSN.test(opts.from)
        ? { lsn: opts.from.toUpperCase() }
        : die(
            EXIT_USAGE,
            `--from must be earliest, latest or an LSN like 0/16B3748, got ${opts.from}`,
          );
  const batchSize = Number(opts.batchSize);
  const { parseDuration } = await import('../common/config.js');
  let pollIntervalMs: number;
  try {
    pollIntervalMs = parseDuration('--poll-interval', opts.pollInterval);
  } catch (error) {
    die(EXIT_USAGE, (error as Error).message);
  }
  const [{ GroupMember, ConsumeError }, { printBatch, execBatch }, log] = await Promise.all([
    import('../consumer/consumer.js'),
    import('../consumer/batch-output.js'),
    commandLog(loaded),
  ]);
  let member: InstanceType<typeof GroupMember>;
  try {
    member = new GroupMember(
      loaded.buffer,
      {
        group: opts.group,
        sources: opts.source,
        from,
        batchSize,
        pollIntervalMs,
        listen: opts.listen,
        leaseTtlMs: loaded.leaseTtlMs,
        leaseRenewIntervalMs: loaded.leaseRenewIntervalMs,
        rebalanceMinHoldMs: loaded.rebalanceMinHoldMs,
      },
      opts.exec === undefined
        ? (batch) => printBatch(batch, process.stdout)
        : (batch) => execBatch(batch, opts.exec!, opts.group),
      log,
      version(),
    );
  } catch (error) {
    if (error instanceof ConsumeError) die(EXIT_USAGE, error.message);
    throw error;
  }
  let stopping: Promise<void> | null = null;
  const stop = () => (stopping ??= member.stop());
  process.once('SIGTERM', () => void stop());
  process.once('SIGINT', () => void stop());
  // The reader of the pipe went away (`| head`): the batch being written is not committed.
  process.stdout.on('error', () => void stop());
  try {
    await member.start();
  } catch (error) {
    if (error instanceof ConsumeError) die(EXIT_USAGE, error.message);
    await failCommand(error);
  }
  process.stderr.write(
    opts.exec === undefined
      ? `philotes: consuming as group "${opts.group}" to stdout: at-least-once (a batch is committed once written to the pipe; what the reader of the pipe had not done when it or this process died comes again). For exactly once, write the effects in the batch's transaction (the consume() API).\n`
      : `philotes: consuming as group "${opts.group}" through "${opts.exec}": a batch is committed only after the command exited 0; at-least-once (a batch whose command succeeded may come again if this process dies before its commit).\n`,
  );
  await member.done.catch(async (error: unknown) =>
    (error as { code?: unknown }).code === 'PH005'
      ? die(EXIT_USAGE, (error as Error).message)
      : failCommand(error),
  );
  process.exit(EXIT_OK);
}

export function registerConsume(program: Command): void {
  program
    .command('consume')
    .description(
      "read the buffer as a member of a consumer group and print its events as JSON lines (or give each batch to --exec), moving the group's position after each batch; several processes of one group share its sources",
    )
    .requiredOption('--group <name>', 'the consumer group (created if new)')
    .option(
      '--source <id...>',
      'the sources to read (repeatable); default: every source in the buffer, new ones as they appear',
    )
    .option(
      '--from <where>',
      'where the group begins a source it has no position of yet: earliest, latest, or an LSN',
      'earliest',
    )
    .addOption(
      new Option('--format <format>', 'the output format').choices(['jsonl']).default('jsonl'),
    )
    .option(
      '--exec <command>',
      'run this shell command for each batch, the records as JSON lines on its stdin; the position moves only after it exits 0 (else it is run again, with a backoff)',
    )
    .option('--batch-size <n>', 'records per batch', '1000')
    .option(
      '--poll-interval <duration>',
      'how often to look for new events without a wake-up',
      '1s',
    )
    .option(
      '--no-listen',
      'do not LISTEN for wake-ups, poll only (a transaction-pooling PgBouncer)',
    )
    .action(consumeCommand);
}
