/**
 * What every command shares: the configuration as the command line names it (--config wins over
 * PHILOTES_CONFIG), its errors printed one per line, the version, and the log a command writes
 * (to stderr: stdout is the command's report). Light on purpose: main.ts imports every command's
 * definition at start-up, and `run` must start its reader threads before the heavy modules load.
 */
import { readFileSync } from 'node:fs';
import {
  ConfigError,
  loadConfig,
  loadConsumerConfig,
  type Config,
  type ConsumerConfig,
} from '../common/config.js';
import type { Logger } from '../common/logger.js';
import { CommandError, die, EXIT_ERROR, EXIT_USAGE, oneLine } from '../common/exit.js';

/** The --config option, if given. */
let configPath: string | undefined;

export function setConfigPath(path: string | undefined): void {
  configPath = path;
}

/** The configuration, or an exit 2 with every problem on a line of its own (none carries a secret). */
export function cliConfig(): Config;
/** As a consumer reads it (loadConsumerConfig: the buffer alone will do). */
export function cliConfig(consumer: 'consumer'): ConsumerConfig;
export function cliConfig(consumer?: 'consumer'): Config | ConsumerConfig {
  try {
    return consumer === undefined
      ? loadConfig(process.env, configPath)
      : loadConsumerConfig(process.env, configPath);
  } catch (error) {
    if (error instanceof ConfigError) {
      for (const problem of error.problems.slice(0, -1))
        process.stderr.write(`philotes: ${oneLine(problem)}\n`);
      die(EXIT_USAGE, error.problems[error.problems.length - 1] ?? error.message);
    }
    throw error;
  }
}

/** A command's log: to stderr, at warn unless a quieter or louder level is configured. */
export async function commandLog(config: Pick<Config, 'logLevel'>): Promise<Logger> {
  const { createCommandLogger } = await import('../common/logger.js');
  return createCommandLogger(config.logLevel === 'info' ? 'warn' : config.logLevel);
}

/**
 * How a command that failed ends: its own exit code for a CommandError (what it could not do),
 * 2 for what a person must fix (a fatal error), else 1; the message on one line.
 */
export async function failCommand(error: unknown): Promise<never> {
  if (error instanceof CommandError) die(error.exitCode, error.message);
  const { isFatal } = await import('../common/errors.js');
  die(isFatal(error) ? EXIT_USAGE : EXIT_ERROR, (error as Error).message);
}

/** A report line to stdout. */
export function print(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** Philotes' version, from package.json: two levels up from src/, three from dist/src/. */
export function version(): string {
  for (const up of ['../../../package.json', '../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(up, import.meta.url), 'utf8')) as {
        name?: string;
        version: string;
      };
      if (pkg.name === 'philotes') return pkg.version;
    } catch {
      // not this one
    }
  }
  return 'unknown';
}
