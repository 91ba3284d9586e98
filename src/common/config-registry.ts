/**
 * Every setting, declared once: its environment variable, its key in a configuration file, its
 * default as documented, how it is read and checked, and one line of doc. Both loaders walk these
 * lists (config.ts for the environment, config-file.ts for a file); docs/configuration.md's
 * tables and philotes.example.yaml are held equal to them by test/unit/config-docs.test.ts. A new
 * setting is one entry here, one field in config-types.ts, and the rows that test asks for (its
 * failure message prints the tables as they must read).
 */
import {
  ConfigError,
  duration,
  flag,
  get,
  identifier,
  integer,
  keylessTables,
  prefixes,
  Problems,
  protocolVersion,
  snapshotMode,
  tables,
} from './config-fields.js';
import type {
  Config,
  Env,
  KeylessTables,
  LogLevel,
  SnapshotMode,
  SourceSettings,
} from './config-types.js';

/** What the docs say about a setting. */
export interface SettingDoc {
  /** The environment variable. */
  readonly env: string;
  /** The key in a configuration file (per source and under `defaults:`, or at the top level). */
  readonly fileKey: string;
  /** The default, as the docs write it. */
  readonly default: string;
  /** One line of doc. */
  readonly doc: string;
}

export interface Setting<K extends string, T> extends SettingDoc {
  /** The field of the configuration it fills. */
  readonly key: K;
  /** Reads and checks it from a flat map of strings under `name` (absent: the default). */
  readonly read: (env: Env, name: string) => T;
}

// ---- a source's tunables (SourceSettings): per source, under `defaults:`, or PHILOTES_CDC_* ----

export const SOURCE_SETTINGS: ReadonlyArray<Setting<keyof SourceSettings, number>> = [
  {
    key: 'checkpointIntervalMs',
    fileKey: 'checkpointInterval',
    env: 'PHILOTES_CDC_CHECKPOINT_INTERVAL',
    default: '10s',
    doc: 'how often the durable position is confirmed to the source',
    read: (env, name) => duration(env, name, '10s', 10, 3_600_000),
  },
  {
    key: 'sourceTimeoutMs',
    fileKey: 'sourceTimeout',
    env: 'PHILOTES_CDC_SOURCE_TIMEOUT',
    default: '30s',
    doc: 'a replication connection silent this long (Philotes asks for replies) is treated as dead and reopened',
    read: (env, name) => duration(env, name, '30s', 1000, 3_600_000),
  },
  {
    key: 'walSenderTimeoutMs',
    fileKey: 'walSenderTimeout',
    env: 'PHILOTES_CDC_WAL_SENDER_TIMEOUT',
    default: '15s',
    doc: "the replication connection's own wal_sender_timeout (PostgreSQL 12+; 0: the server's): how soon the source frees the slot of a reader that vanished (a host lost, a frozen process), so that another replica can take it",
    read: (env, name) => {
      const ms = duration(env, name, '15s', 0, 3_600_000);
      // Below a second, a reader busy for a moment would lose its connection.
      if (ms > 0 && ms < 1000)
        throw new ConfigError(`${name} must be 0 (the server's) or at least 1s, got ${ms}ms`);
      return ms;
    },
  },
  {
    key: 'batchMaxRows',
    fileKey: 'batchMaxRows',
    env: 'PHILOTES_CDC_BATCH_MAX_ROWS',
    default: '5000',
    doc: 'a batch is sent to the supervisor at this many events...',
    read: (env, name) => integer(env, name, 5000, 1, 1_000_000),
  },
  {
    key: 'batchMaxBytes',
    fileKey: 'batchMaxBytes',
    env: 'PHILOTES_CDC_BATCH_MAX_BYTES',
    default: '4194304',
    doc: '...or this many bytes...',
    read: (env, name) => integer(env, name, 4 * 1024 * 1024, 1024, 256 * 1024 * 1024),
  },
  {
    key: 'batchMaxWaitMs',
    fileKey: 'batchMaxWait',
    env: 'PHILOTES_CDC_BATCH_MAX_WAIT',
    default: '0ms',
    doc: '...or, at 0, as soon as the reader has handled all the source has sent; above 0, when its first event has waited this long (fewer, larger buffer transactions at low rates)',
    read: (env, name) => duration(env, name, '0ms', 0, 60_000),
  },
  {
    key: 'maxInFlightBatches',
    fileKey: 'maxInFlightBatches',
    env: 'PHILOTES_CDC_MAX_IN_FLIGHT_BATCHES',
    default: '4',
    doc: 'batches sent but not yet stored before the reader stops reading the slot',
    read: (env, name) => integer(env, name, 4, 1, 64),
  },
  {
    key: 'snapshotChunkRows',
    fileKey: 'snapshotChunkRows',
    env: 'PHILOTES_CDC_SNAPSHOT_CHUNK_ROWS',
    default: '10000',
    doc: 'rows a snapshot reads per chunk (one short query between two watermarks)',
    read: (env, name) => integer(env, name, 10_000, 1, 1_000_000),
  },
  {
    key: 'snapshotParallelTables',
    fileKey: 'snapshotParallelTables',
    env: 'PHILOTES_CDC_SNAPSHOT_PARALLEL_TABLES',
    default: '1',
    doc: 'tables a snapshot copies at once, each on a source connection of its own',
    read: (env, name) => integer(env, name, 1, 1, 16),
  },
  {
    key: 'readerHeapLimitMb',
    fileKey: 'readerHeapLimitMb',
    env: 'PHILOTES_CDC_READER_HEAP_LIMIT_MB',
    default: '512',
    doc: "the reader thread's JS heap limit in MB: a reader that exceeds it is restarted, alone",
    read: (env, name) => integer(env, name, 512, 4, 65_536),
  },
];

// ---- what a source is (SourceConfig): per source in a file, or PHILOTES_CDC_* ----

/**
 * The source's own settings. `id` and `slot` are read by each loader itself (the environment's id
 * defaults to the slot name; a file requires both), the rest through `read`.
 */
export const SOURCE_IDENTITY = {
  id: {
    env: 'PHILOTES_CDC_SOURCE_ID',
    fileKey: 'id',
    default: 'the slot name',
    doc: "the source's identity in the buffer (events, checkpoint, schema history); in a file required and unique",
  },
  slot: {
    env: 'PHILOTES_CDC_REPLICATION_SLOT',
    fileKey: 'slot',
    default: 'philotes_cdc',
    doc: 'the replication slot, [a-z_][a-z0-9_]*; in a file required, one per source and server',
  },
  publication: {
    env: 'PHILOTES_CDC_PUBLICATION',
    fileKey: 'publication',
    default: 'philotes_pub',
    doc: 'the publication, [a-z_][a-z0-9_]*',
    read: (env: Env, name: string): string => identifier(env, name, 'philotes_pub'),
  },
  tables: {
    env: 'PHILOTES_CDC_TABLES',
    fileKey: 'tables',
    default: 'all tables',
    doc: 'schema.table list for a publication Philotes creates (comma-separated; a list in a file); none: FOR ALL TABLES',
    read: (env: Env, name: string): string[] => tables(env, name),
  },
  partitionRoot: {
    env: 'PHILOTES_CDC_PARTITION_ROOT',
    fileKey: 'partitionRoot',
    default: 'on',
    doc: "a publication Philotes creates publishes a partitioned table's changes as the root table (off: as the partition)",
    read: (env: Env, name: string): boolean => flag(env, name, true),
  },
  messages: {
    env: 'PHILOTES_CDC_MESSAGES',
    fileKey: 'messages',
    default: 'none',
    doc: 'prefixes of logical messages (pg_logical_emit_message) stored as MESSAGE events (comma-separated; a list in a file)',
    read: (env: Env, name: string): string[] => prefixes(env, name),
  },
  ddl: {
    env: 'PHILOTES_CDC_DDL',
    fileKey: 'ddl',
    default: 'off',
    doc: 'on: capture DDL as DDL events through an event trigger on the source (PostgreSQL 14+; installing it needs a superuser)',
    read: (env: Env, name: string): boolean => flag(env, name, false),
  },
  failover: {
    env: 'PHILOTES_CDC_FAILOVER',
    fileKey: 'failover',
    default: 'off',
    doc: 'on: create the slot with FAILOVER (PostgreSQL 17+), so that a standby with sync_replication_slots keeps it and capture resumes exactly on the promoted standby',
    read: (env: Env, name: string): boolean => flag(env, name, false),
  },
  protocol: {
    env: 'PHILOTES_CDC_PROTOCOL',
    fileKey: 'protocol',
    default: 'auto',
    doc: 'pgoutput protocol: 2 streams large transactions while in progress (PostgreSQL 14+), 1 lets the server spill them; auto: 2 where the server has it',
    read: (env: Env, name: string): 1 | 2 | null => protocolVersion(env, name),
  },
  snapshot: {
    env: 'PHILOTES_CDC_SNAPSHOT',
    fileKey: 'snapshot',
    default: 'initial',
    doc: 'initial: a source new to the buffer copies the rows its tables hold first; never: changes only; when_needed: also again after a lost slot, instead of stopping',
    read: (env: Env, name: string): SnapshotMode => snapshotMode(env, name),
  },
  keylessTables: {
    env: 'PHILOTES_CDC_KEYLESS_TABLES',
    fileKey: 'keylessTables',
    default: 'block',
    doc: 'a publication Philotes creates and tables without a replica identity (their UPDATE/DELETE would fail): block (do not create it), leave_out (list the others, kept current), identity_full, accept',
    read: (env: Env, name: string): KeylessTables => keylessTables(env, name),
  },
} as const satisfies Record<string, SettingDoc & { read?: (env: Env, name: string) => unknown }>;

// ---- connections: PHILOTES_CDC_SOURCE_* and PHILOTES_BUFFER_*, or a file's keys ----

/** A connection's fields: the variable is `<prefix>_<SUFFIX>`, the file key as given. */
export const CONNECTION_FIELDS: ReadonlyArray<{
  readonly suffix: string;
  readonly fileKey: string;
  readonly default: string;
  readonly doc: string;
}> = [
  {
    suffix: 'URL',
    fileKey: 'url',
    default: '—',
    doc: 'URL, postgres://user:password@host:port/database?sslmode=…; the fields below override its parts',
  },
  { suffix: 'HOST', fileKey: 'host', default: 'localhost', doc: 'host' },
  { suffix: 'PORT', fileKey: 'port', default: '5432', doc: 'port' },
  { suffix: 'DATABASE', fileKey: 'database', default: 'required', doc: 'database' },
  { suffix: 'USER', fileKey: 'user', default: 'required', doc: 'user' },
  {
    suffix: 'PASSWORD',
    fileKey: 'password',
    default: '—',
    doc: 'password (a file may name a variable instead, passwordEnv, or a file, passwordFile: a Kubernetes secret)',
  },
  {
    suffix: 'SSLMODE',
    fileKey: 'sslmode',
    default: 'prefer',
    doc: 'TLS mode: disable, prefer (plain text: node-postgres cannot fall back), require, verify-ca or verify-full',
  },
  {
    suffix: 'SSLROOTCERT',
    fileKey: 'sslRootCert',
    default: '—',
    doc: 'CA certificate file (PEM) for verify-ca / verify-full',
  },
];

/** A file's connection keys: the fields, and the two other ways to give a password. */
export const CONNECTION_FILE_KEYS = [
  ...CONNECTION_FIELDS.map((f) => f.fileKey),
  'passwordEnv',
  'passwordFile',
] as const;

// ---- process-wide settings: the environment, or a file's top level (the variable wins) ----

type ProcessSettings = Omit<Config, 'sources' | 'buffer' | 'origin' | keyof SourceSettings>;

const LOG_LEVELS: readonly LogLevel[] = [
  'fatal',
  'error',
  'warn',
  'info',
  'debug',
  'trace',
  'silent',
];

function logLevel(env: Env, name: string): LogLevel {
  const level = get(env, name) ?? 'info';
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new ConfigError(
      `${name} must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(level)}`,
    );
  }
  return level as LogLevel;
}

export const PROCESS_SETTINGS: ReadonlyArray<Setting<keyof ProcessSettings, unknown>> = [
  {
    key: 'logLevel',
    env: 'PHILOTES_LOG_LEVEL',
    fileKey: 'logLevel',
    default: 'info',
    doc: LOG_LEVELS.join(', '),
    read: logLevel,
  },
  {
    key: 'restartMinDelayMs',
    env: 'PHILOTES_RESTART_MIN_DELAY',
    fileKey: 'restartMinDelay',
    default: '500ms',
    doc: 'the first backoff between reader restarts (doubling, jittered)',
    read: (env, name) => duration(env, name, '500ms', 10, 3_600_000),
  },
  {
    key: 'restartMaxDelayMs',
    env: 'PHILOTES_RESTART_MAX_DELAY',
    fileKey: 'restartMaxDelay',
    default: '30s',
    doc: 'the longest backoff, and how often a failed source is tried again',
    read: (env, name) => duration(env, name, '30s', 10, 3_600_000),
  },
  {
    key: 'metricsPort',
    env: 'PHILOTES_METRICS_PORT',
    fileKey: 'metricsPort',
    default: '9753',
    doc: 'HTTP port for /metrics, /healthz, /readyz and the status page; 0 turns the server off',
    read: (env, name) => integer(env, name, 9753, 0, 65535),
  },
  {
    key: 'metricsHost',
    env: 'PHILOTES_METRICS_HOST',
    fileKey: 'metricsHost',
    default: '0.0.0.0',
    doc: 'the address the HTTP server binds',
    read: (env, name) => get(env, name) ?? '0.0.0.0',
  },
  {
    key: 'shutdownTimeoutMs',
    env: 'PHILOTES_SHUTDOWN_TIMEOUT',
    fileKey: 'shutdownTimeout',
    default: '10s',
    doc: 'after a stop signal, exit anyway after this long',
    read: (env, name) => duration(env, name, '10s', 100, 600_000),
  },
  {
    key: 'readinessGraceMs',
    env: 'PHILOTES_READINESS_GRACE',
    fileKey: 'readinessGrace',
    default: '60s',
    doc: '/readyz answers 503 once a source has not streamed for this long',
    read: (env, name) => duration(env, name, '60s', 1000, 86_400_000),
  },
  {
    key: 'commitWriters',
    env: 'PHILOTES_COMMIT_WRITERS',
    fileKey: 'commitWriters',
    default: '2',
    doc: 'buffer transactions in progress at once (each a buffer connection)',
    read: (env, name) => integer(env, name, 2, 1, 64),
  },
  {
    key: 'commitCoalesce',
    env: 'PHILOTES_COMMIT_COALESCE',
    fileKey: 'commitCoalesce',
    default: 'on',
    doc: 'store the batches several sources have waiting in one buffer transaction',
    read: (env, name) => flag(env, name, true),
  },
  {
    key: 'wakeups',
    env: 'PHILOTES_WAKEUPS',
    fileKey: 'wakeups',
    default: 'on',
    doc: 'after a buffer commit that stored events, NOTIFY philotes_events with the source id (a short transaction of its own, at most one per source every 100 ms), so that consumers need not poll; off: consumers find new events by polling',
    read: (env, name) => flag(env, name, true),
  },
  {
    key: 'maxBytesInFlight',
    env: 'PHILOTES_MAX_BYTES_IN_FLIGHT',
    fileKey: 'maxBytesInFlight',
    default: '134217728',
    doc: 'bytes of batches received and not yet stored, all sources together, before every reader holds',
    read: (env, name) =>
      integer(env, name, 128 * 1024 * 1024, 1024 * 1024, 64 * 1024 * 1024 * 1024),
  },
  {
    key: 'leaseTtlMs',
    env: 'PHILOTES_LEASE_TTL',
    fileKey: 'leaseTtl',
    default: '6s',
    doc: "a source's lease lasts this long unrenewed: after a replica dies, another takes its sources after at most this",
    read: (env, name) => duration(env, name, '6s', 1000, 600_000),
  },
  {
    key: 'leaseRenewIntervalMs',
    env: 'PHILOTES_LEASE_RENEW_INTERVAL',
    fileKey: 'leaseRenewInterval',
    default: '2s',
    doc: 'how often a replica renews its leases (one statement for all) and looks for free ones; at most half the TTL',
    read: (env, name) => duration(env, name, '2s', 100, 300_000),
  },
  {
    key: 'rebalanceMinHoldMs',
    env: 'PHILOTES_REBALANCE_MIN_HOLD',
    fileKey: 'rebalanceMinHold',
    default: '10s',
    doc: 'a replica above its fair share hands sources back to the others (gracefully) only after holding them this long, so that nothing flaps while replicas come and go',
    read: (env, name) => duration(env, name, '10s', 0, 3_600_000),
  },
  {
    key: 'retentionMs',
    env: 'PHILOTES_RETENTION',
    fileKey: 'retention',
    default: '7d',
    doc: 'events are kept at least this long; a partition older than this is dropped once every consumer group has read it (0: keep everything)',
    read: (env, name) => duration(env, name, '7d', 0, 3650 * 86_400_000),
  },
  {
    key: 'retentionMaxMs',
    env: 'PHILOTES_RETENTION_MAX',
    fileKey: 'retentionMax',
    default: '30d',
    doc: 'a partition older than this is dropped even if a consumer group has not read it: that group is expired, loudly (0: groups hold partitions for ever)',
    read: (env, name) => duration(env, name, '30d', 0, 3650 * 86_400_000),
  },
  {
    key: 'partitionIntervalMs',
    env: 'PHILOTES_PARTITION_INTERVAL',
    fileKey: 'partitionInterval',
    default: '1d',
    doc: "the time range of one cdc_events partition (by the buffer's clock when the event was stored); retention drops whole partitions",
    read: (env, name) => duration(env, name, '1d', 10_000, 31 * 86_400_000),
  },
  {
    key: 'partitionsAhead',
    env: 'PHILOTES_PARTITIONS_AHEAD',
    fileKey: 'partitionsAhead',
    default: '3',
    doc: 'partitions made ahead of need: the capture keeps storing this many intervals even if maintenance cannot run',
    read: (env, name) => integer(env, name, 3, 1, 1000),
  },
  {
    key: 'maxSources',
    env: 'PHILOTES_MAX_SOURCES',
    fileKey: 'maxSources',
    default: '0',
    doc: 'at most this many sources captured by one replica (0: its fair share of the live replicas, no other bound)',
    read: (env, name) => integer(env, name, 0, 0, 100_000),
  },
];

/** Where the configuration comes from, when not from the environment alone. */
export const CONFIG_FILE_SETTING: SettingDoc = {
  env: 'PHILOTES_CONFIG',
  fileKey: '',
  default: '—',
  doc: 'a configuration file with any number of sources (or --config); then sources come from the file only',
};

// ---- walking the lists ----

/**
 * Source settings read from `env` under `name(setting)`; a setting not there comes from
 * `fallback` (the file's defaults), else from its documented default.
 */
export function readSourceSettings(
  env: Env,
  name: (setting: (typeof SOURCE_SETTINGS)[number]) => string,
  problems: Problems,
  fallback?: SourceSettings,
): SourceSettings {
  const settings: Record<string, number> = {};
  for (const setting of SOURCE_SETTINGS) {
    const key = name(setting);
    const value =
      fallback !== undefined && get(env, key) === undefined
        ? fallback[setting.key]
        : problems.attempt(() => setting.read(env, key));
    settings[setting.key] = value ?? 0;
  }
  return Object.freeze(settings as unknown as SourceSettings);
}

/** The process-wide settings, each read under `name(variable)` (a file names them its own way). */
export function readProcessSettings(
  source: Env,
  problems: Problems,
  name: (variable: string) => string = (variable) => variable,
): ProcessSettings {
  const settings: Record<string, unknown> = {};
  for (const setting of PROCESS_SETTINGS) {
    settings[setting.key] = problems.attempt(() => setting.read(source, name(setting.env)));
  }
  const min = settings['restartMinDelayMs'] as number | undefined;
  const max = settings['restartMaxDelayMs'] as number | undefined;
  if (min !== undefined && max !== undefined && max < min) {
    problems.add(
      `${name('PHILOTES_RESTART_MAX_DELAY')} must not be less than ${name('PHILOTES_RESTART_MIN_DELAY')}`,
    );
  }
  const retention = settings['retentionMs'] as number | undefined;
  const retentionMax = settings['retentionMaxMs'] as number | undefined;
  if (retention !== undefined && retentionMax !== undefined && retentionMax !== 0) {
    if (retention === 0 || retentionMax < retention)
      problems.add(
        `${name('PHILOTES_RETENTION_MAX')} must be 0 or at least ${name('PHILOTES_RETENTION')} (which must then not be 0)`,
      );
  }
  const ttl = settings['leaseTtlMs'] as number | undefined;
  const renew = settings['leaseRenewIntervalMs'] as number | undefined;
  // A replica stops a source one interval before its TTL: with less than two intervals it
  // would stop between every pair of renewals.
  if (ttl !== undefined && renew !== undefined && ttl < 2 * renew) {
    problems.add(
      `${name('PHILOTES_LEASE_RENEW_INTERVAL')} must be at most half of ${name('PHILOTES_LEASE_TTL')}`,
    );
  }
  // A setting that failed its check is reported; the value left is never used (the load throws).
  return settings as unknown as ProcessSettings;
}
