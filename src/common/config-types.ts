/**
 * The configuration's types, in a leaf of their own: the loaders (config.ts, config-file.ts),
 * the registry of settings (config-registry.ts) and the checks (config-fields.ts) all import
 * them, and none imports another's types through a circle.
 */

export type Env = Readonly<Record<string, string | undefined>>;

export type SnapshotMode = 'initial' | 'never' | 'when_needed';

/**
 * What a publication Philotes creates does with tables without a replica identity, whose UPDATE
 * and DELETE PostgreSQL refuses once they are published (docs/configuration.md, Tables without a
 * replica identity).
 */
export type KeylessTables = 'block' | 'leave_out' | 'identity_full' | 'accept';

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';

export type SslMode = 'disable' | 'prefer' | 'require' | 'verify-ca' | 'verify-full';

export interface ConnectionConfig {
  readonly host: string;
  readonly port: number;
  readonly database: string;
  readonly user: string;
  readonly password: string | undefined;
  readonly sslmode: SslMode;
  /** PEM of the CA that signs the server's certificate (from `_SSLROOTCERT`), for verify-*. */
  readonly sslRootCert: string | undefined;
  /**
   * The file the password came from (a file's `passwordFile`, a mounted secret): read again at
   * every connection attempt, so that a rotated secret is used without a signal or a restart.
   * `password` holds what it said at load, the fallback while the file cannot be read.
   */
  readonly passwordFile?: string | undefined;
  /** The file `sslRootCert` came from: read again whenever a connection's options are built. */
  readonly sslRootCertFile?: string | undefined;
  /**
   * The setting that gave the password, as the user wrote it (`PHILOTES_BUFFER_PASSWORD`, the
   * `_URL`, `buffer.passwordEnv`, `sources[1].passwordFile`): what an error about the password
   * names. Undefined when none was given.
   */
  readonly passwordSetting?: string | undefined;
  /** The environment variable a file's `passwordEnv` names (print-config refers to it). */
  readonly passwordEnv?: string | undefined;
  /** Read from the environment (PHILOTES_BUFFER_*, PHILOTES_CDC_SOURCE_*), not a file's keys. */
  readonly fromEnvironment?: boolean | undefined;
}

/** A source's tunables (PHILOTES_CDC_* in the environment; per source and in `defaults` in a file). */
export interface SourceSettings {
  /** How often the durable position is confirmed to the source. */
  readonly checkpointIntervalMs: number;
  /** A replication connection silent for longer than this is treated as dead. */
  readonly sourceTimeoutMs: number;
  /**
   * The replication connection's own wal_sender_timeout (PostgreSQL 12+; 0: the server's): how
   * soon the source lets go of a slot whose reader vanished without closing its connection.
   */
  readonly walSenderTimeoutMs: number;
  /** A batch is sent to the supervisor when it holds this many rows ... */
  readonly batchMaxRows: number;
  /** ... or this many bytes of encoded events ... */
  readonly batchMaxBytes: number;
  /**
   * ... or when its first row has waited this long; 0 (the default): as soon as the reader has
   * handled everything the source has sent so far.
   */
  readonly batchMaxWaitMs: number;
  /** Batches a reader may have sent but not seen stored before it stops reading the slot. */
  readonly maxInFlightBatches: number;
  /** The reader thread's JS heap limit: a reader that exceeds it is restarted, alone. */
  readonly readerHeapLimitMb: number;
  /** Rows a snapshot reads per chunk (one short query between two watermarks). */
  readonly snapshotChunkRows: number;
  /** Tables a snapshot copies at once, each on a source connection of its own. */
  readonly snapshotParallelTables: number;
}

export interface SourceConfig {
  readonly settings: SourceSettings;
  /** Stable identity of the source in the buffer (checkpoints, events, schema history). */
  readonly id: string;
  readonly connection: ConnectionConfig;
  readonly slot: string;
  readonly publication: string;
  /** Tables for a newly created publication (`schema.table`); empty means FOR ALL TABLES. */
  readonly tables: readonly string[];
  /**
   * A publication Philotes creates publishes a partitioned table's changes as the root table
   * (publish_via_partition_root, PostgreSQL 13+); false: as the partition each row is in.
   */
  readonly partitionRoot: boolean;
  /**
   * Prefixes of logical messages (pg_logical_emit_message) to capture as MESSAGE events; empty:
   * none are requested from the server.
   */
  readonly messages: readonly string[];
  /**
   * Capture DDL as DDL events: Philotes installs an event trigger on the source that writes each
   * command as a transactional logical message (PostgreSQL 14+; installing needs a superuser).
   */
  readonly ddl: boolean;
  /**
   * Create the slot with FAILOVER (PostgreSQL 17+): a standby with sync_replication_slots keeps
   * it, so that after a promotion capture resumes from the buffer's checkpoint, exactly.
   */
  readonly failover: boolean;
  /**
   * pgoutput protocol version. 2 streams large transactions while they are in progress instead
   * of letting the server spill them to its disk until commit (PostgreSQL 14+); null (auto): 2
   * where the server has it, else 1.
   */
  readonly protocol: 1 | 2 | null;
  /**
   * initial: a source new to the buffer first copies the rows its tables hold; never: only
   * changes; when_needed: also copies again after a lost slot instead of failing.
   */
  readonly snapshot: SnapshotMode;
  /**
   * block: a publication Philotes would create over a table without a replica identity is not
   * created (the source stops and names the tables); leave_out: the publication lists every
   * other table and Philotes keeps it current; identity_full: Philotes gives those tables
   * REPLICA IDENTITY FULL; accept: published anyway (their UPDATE and DELETE fail).
   */
  readonly keylessTables: KeylessTables;
  /** The file the source was read from (absent: the environment), for commands suggested. */
  readonly configFile?: string | undefined;
}

/**
 * The whole configuration. The SourceSettings at the top level are the defaults every source's
 * own settings start from (the environment's, or the file's `defaults`).
 */
export interface Config extends SourceSettings {
  readonly sources: readonly SourceConfig[];
  readonly buffer: ConnectionConfig;
  /** Where the configuration came from: the environment, or the file's path. */
  readonly origin: 'environment' | { readonly file: string };
  /** 0 disables the HTTP server. */
  readonly metricsPort: number;
  readonly metricsHost: string;
  readonly logLevel: LogLevel;
  readonly shutdownTimeoutMs: number;
  /** Backoff between reader restarts. */
  readonly restartMinDelayMs: number;
  readonly restartMaxDelayMs: number;
  /** /readyz answers 503 once a source has not streamed for this long. */
  readonly readinessGraceMs: number;
  /** Buffer transactions in progress at once (the writer's connections). */
  readonly commitWriters: number;
  /** Store several sources' waiting batches in one buffer transaction. */
  readonly commitCoalesce: boolean;
  /** NOTIFY philotes_events after commits that stored events, for consumers (wakeups.ts). */
  readonly wakeups: boolean;
  /** Bytes of batches queued or being written, across all sources, before every reader holds. */
  readonly maxBytesInFlight: number;
  /** A source's lease lasts this long unrenewed (src/buffer/leases.ts). */
  readonly leaseTtlMs: number;
  /** How often a replica renews all its leases (one statement). */
  readonly leaseRenewIntervalMs: number;
  /** At most this many sources per replica; 0: the fair share alone. */
  readonly maxSources: number;
  /** Events are kept at least this long (0: for ever); see src/buffer/partitions.ts. */
  readonly retentionMs: number;
  /** A partition older than this is dropped even if a group lags (it is expired); 0: never. */
  readonly retentionMaxMs: number;
  readonly partitionIntervalMs: number;
  readonly partitionsAhead: number;
  /** A lease is held at least this long before it is handed back to rebalance. */
  readonly rebalanceMinHoldMs: number;
}
