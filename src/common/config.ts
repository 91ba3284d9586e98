/**
 * The one place that reads the configuration: the environment (one source) or a configuration
 * file (PHILOTES_CONFIG / --config, any number of sources; config-file.ts). Everything else
 * receives the frozen, validated `Config` this module returns. Every problem is reported at
 * once, each naming the variable or the file's key and what is wrong, and never echoing a
 * password or a connection URL (which may carry one).
 */
import {
  ConfigError,
  connection,
  envNames,
  get,
  identifier,
  Problems,
  sourceId,
} from './config-fields.js';
import { loadConfigFile } from './config-file.js';
import {
  CONFIG_FILE_SETTING,
  readProcessSettings,
  readSourceSettings,
  SOURCE_IDENTITY as S,
} from './config-registry.js';
import type { Config, Env, SourceConfig } from './config-types.js';

export { ConfigError, parseDuration } from './config-fields.js';
export type {
  Config,
  ConnectionConfig,
  Env,
  KeylessTables,
  LogLevel,
  SnapshotMode,
  SourceConfig,
  SourceSettings,
  SslMode,
} from './config-types.js';

/**
 * The configuration: from the file named by `configPath` (the --config option) or
 * PHILOTES_CONFIG if either is set, else from the environment alone (one source).
 */
export function loadConfig(env: Env = process.env, configPath?: string): Config {
  const file = configPath ?? get(env, CONFIG_FILE_SETTING.env);
  if (file !== undefined) return loadConfigFile(file, env);
  return loadEnvConfig(env);
}

/**
 * What a command of the buffer alone needs (`consume`, `partition-buffer`): the buffer, the log,
 * the leases, the partitions.
 */
export type ConsumerConfig = Pick<
  Config,
  | 'buffer'
  | 'origin'
  | 'logLevel'
  | 'leaseTtlMs'
  | 'leaseRenewIntervalMs'
  | 'rebalanceMinHoldMs'
  | 'partitionIntervalMs'
  | 'partitionsAhead'
>;

/**
 * A consumer's configuration: the file's (all of it checked, as for `run`) if one is named, else
 * the buffer's connection and the process settings from the environment, with no source: a
 * consumer may run where only the buffer is known.
 */
export function loadConsumerConfig(env: Env = process.env, configPath?: string): ConsumerConfig {
  const file = configPath ?? get(env, CONFIG_FILE_SETTING.env);
  if (file !== undefined) return loadConfigFile(file, env);
  const problems = new Problems();
  const buffer = problems.attempt(() =>
    Object.freeze({ ...connection(env, envNames('PHILOTES_BUFFER')), fromEnvironment: true }),
  );
  const processWide = readProcessSettings(env, problems);
  problems.throwIfAny();
  return Object.freeze({ buffer: buffer!, origin: 'environment' as const, ...processWide });
}

function loadEnvConfig(env: Env): Config {
  // Nothing configured at all: say how to configure, not which one variable is missing first.
  if (!Object.keys(env).some((key) => key.startsWith('PHILOTES_') && get(env, key) !== undefined))
    throw new ConfigError(
      `no configuration: give a file with --config <path> (or ${CONFIG_FILE_SETTING.env}), or set the source and buffer connections in the environment (PHILOTES_CDC_SOURCE_URL and PHILOTES_BUFFER_URL, or their _HOST, _DATABASE, _USER… variables); see docs/configuration.md`,
    );
  const problems = new Problems();
  const slot =
    problems.attempt(() => identifier(env, S.slot.env, S.slot.default)) ?? S.slot.default;
  const id = problems.attempt(() => sourceId(env, S.id.env, slot));
  const settings = readSourceSettings(env, (s) => s.env, problems);
  const source = {
    id,
    connection: problems.attempt(() =>
      Object.freeze({ ...connection(env, envNames('PHILOTES_CDC_SOURCE')), fromEnvironment: true }),
    ),
    slot,
    publication: problems.attempt(() => S.publication.read(env, S.publication.env)),
    tables: problems.attempt(() => Object.freeze(S.tables.read(env, S.tables.env))),
    partitionRoot: problems.attempt(() => S.partitionRoot.read(env, S.partitionRoot.env)),
    messages: problems.attempt(() => Object.freeze(S.messages.read(env, S.messages.env))),
    ddl: problems.attempt(() => S.ddl.read(env, S.ddl.env)),
    failover: problems.attempt(() => S.failover.read(env, S.failover.env)),
    protocol: problems.attempt(() => S.protocol.read(env, S.protocol.env)),
    snapshot: problems.attempt(() => S.snapshot.read(env, S.snapshot.env)),
    keylessTables: problems.attempt(() => S.keylessTables.read(env, S.keylessTables.env)),
    settings,
  };
  const buffer = problems.attempt(() =>
    Object.freeze({ ...connection(env, envNames('PHILOTES_BUFFER')), fromEnvironment: true }),
  );
  const processWide = readProcessSettings(env, problems);
  problems.throwIfAny();
  return Object.freeze({
    sources: Object.freeze([Object.freeze(source as SourceConfig)]),
    buffer: buffer!,
    origin: 'environment' as const,
    ...settings,
    ...processWide,
  });
}
