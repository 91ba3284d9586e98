/**
 * Philotes as a library: `import { consume } from 'philotes'`. A service reads the buffer as a
 * member of a consumer group, exactly once when its handler writes its effects through the
 * transaction it is given (README, "Consuming the buffer").
 */
import { connection, ConfigError } from './common/config-fields.js';
import type { ConnectionConfig } from './common/config.js';
import { createLogger, type Logger } from './common/logger.js';
import { version } from './commands/cli.js';
import { GroupMember, type BatchHandler, type ConsumeSettings } from './consumer/consumer.js';

export type {
  ConsumedRecord,
  EventRecord,
  GapRecord,
  RetractedRecord,
} from './consumer/records.js';
export type { BatchHandler, ConsumedBatch, ConsumeSettings } from './consumer/consumer.js';
export { ConsumeError } from './consumer/consumer.js';
export type { StartAt } from './consumer/batches.js';

export interface ConsumeOptions extends ConsumeSettings {
  /** The buffer database: a postgres:// URL, or a connection as Philotes' configuration has it. */
  readonly buffer: string | ConnectionConfig;
  readonly handler: BatchHandler;
  /** A pino logger; default: warnings and errors as JSON lines on stderr. */
  readonly logger?: Logger;
}

/** A running member of a consumer group. */
export interface Consumer {
  /** The sources this member reads now. */
  owned(): string[];
  /** Finishes the batches in hand, hands its sources to the group's other members, and leaves. */
  stop(): Promise<void>;
  /** Settles once stopped. */
  readonly done: Promise<void>;
}

/**
 * Joins the group (creating it if new) and starts reading; resolves once running, rejects if it
 * cannot start (no Philotes buffer there, a schema too old, a bad setting).
 */
export async function consume(options: ConsumeOptions): Promise<Consumer> {
  const { buffer, handler, logger, ...settings } = options;
  const member = new GroupMember(
    typeof buffer === 'string' ? bufferFromUrl(buffer) : buffer,
    settings,
    handler,
    logger ?? createLogger('warn', { component: 'philotes-consumer' }, 2),
    version(),
  );
  await member.start();
  return { owned: () => member.owned(), stop: () => member.stop(), done: member.done };
}

function bufferFromUrl(url: string): ConnectionConfig {
  try {
    return connection({ url }, (field) => field);
  } catch (error) {
    if (error instanceof ConfigError) throw new ConfigError(`buffer: ${error.message}`);
    throw error;
  }
}
