/**
 * The one place that reads the environment. Everything else receives the frozen, validated
 * `Config` this module returns. Error messages name the variable and what is wrong, and never
 * echo a password or a connection URL (which may carry one).
 */

import { readFileSync } from 'node:fs';

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
}

export interface SourceConfig {
  /** Stable identity of the source in the buffer (checkpoints, events, schema history). */
  readonly id: string;
  readonly connection: ConnectionConfig;
  readonly slot: string;
  readonly publication: string;
  /** Tables for a newly created publication (`schema.table`); empty means FOR ALL TABLES. */
  readonly tables: readonly string[];
}

export interface Config {
  readonly sources: readonly SourceConfig[];
  readonly buffer: ConnectionConfig;
  /** How often the durable position is confirmed to each source. */
  readonly checkpointIntervalMs: number;
  /** A replication connection silent for longer than this is treated as dead. */
  readonly sourceTimeoutMs: number;
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
  /** 0 disables the HTTP server. */
  readonly metricsPort: number;
  readonly metricsHost: string;
  readonly logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  readonly shutdownTimeoutMs: number;
  /** Backoff between reader restarts. */
  readonly restartMinDelayMs: number;
  readonly restartMaxDelayMs: number;
  /** /readyz answers 503 once a source has not streamed for this long. */
  readonly readinessGraceMs: number;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

type Env = Readonly<Record<string, string | undefined>>;

/** Slot and publication names are interpolated into replication commands: keep them plain. */
const IDENTIFIER = /^[a-z_][a-z0-9_]{0,62}$/;
const SOURCE_ID = /^[A-Za-z0-9_.-]{1,128}$/;
const TABLE_NAME = /^([A-Za-z_][A-Za-z0-9_$]*\.)?[A-Za-z_][A-Za-z0-9_$]*$/;
const SSL_MODES: readonly SslMode[] = ['disable', 'prefer', 'require', 'verify-ca', 'verify-full'];
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

function get(env: Env, name: string): string | undefined {
  const value = env[name];
  if (value === undefined) return undefined;
  const trimmed = value.trim();
  return trimmed === '' ? undefined : trimmed;
}

export function parseDuration(name: string, raw: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(raw);
  if (!match) {
    throw new ConfigError(
      `${name} must be a duration like 500ms, 10s or 1m, got ${JSON.stringify(raw)}`,
    );
  }
  const value = Number(match[1]);
  const unit = match[2] ?? 's';
  const factor = unit === 'ms' ? 1 : unit === 's' ? 1000 : unit === 'm' ? 60_000 : 3_600_000;
  return Math.round(value * factor);
}

function duration(env: Env, name: string, fallback: string, min: number, max: number): number {
  const raw = get(env, name) ?? fallback;
  const ms = parseDuration(name, raw);
  if (ms < min || ms > max) {
    throw new ConfigError(
      `${name} must be between ${formatMs(min)} and ${formatMs(max)}, got ${JSON.stringify(raw)}`,
    );
  }
  return ms;
}

function formatMs(ms: number): string {
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0 && ms > 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

function integer(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = get(env, name);
  if (raw === undefined) return fallback;
  if (!/^\d+$/.test(raw) || Number(raw) < min || Number(raw) > max) {
    throw new ConfigError(
      `${name} must be an integer between ${min} and ${max}, got ${JSON.stringify(raw)}`,
    );
  }
  return Number(raw);
}

function sslMode(name: string, raw: string | undefined, fallback: SslMode): SslMode {
  if (raw === undefined) return fallback;
  if (!(SSL_MODES as readonly string[]).includes(raw)) {
    throw new ConfigError(
      `${name} must be one of ${SSL_MODES.join(', ')}, got ${JSON.stringify(raw)}`,
    );
  }
  return raw as SslMode;
}

/**
 * Reads `<prefix>_URL` if set (individual variables then override its parts), otherwise
 * `<prefix>_HOST/_PORT/_DATABASE/_USER/_PASSWORD/_SSLMODE`.
 */
function connection(env: Env, prefix: string): ConnectionConfig {
  let fromUrl: Partial<Record<keyof ConnectionConfig, string>> = {};
  const url = get(env, `${prefix}_URL`);
  if (url !== undefined) fromUrl = parseUrl(`${prefix}_URL`, url);

  const host = get(env, `${prefix}_HOST`) ?? fromUrl.host ?? 'localhost';
  const portName = get(env, `${prefix}_PORT`) !== undefined ? `${prefix}_PORT` : `${prefix}_URL`;
  const portRaw = get(env, `${prefix}_PORT`) ?? fromUrl.port ?? '5432';
  if (!/^\d+$/.test(portRaw) || Number(portRaw) < 1 || Number(portRaw) > 65535) {
    throw new ConfigError(
      portName.endsWith('_URL')
        ? `${portName} has an invalid port: it must be an integer between 1 and 65535`
        : `${portName} must be an integer between 1 and 65535, got ${JSON.stringify(portRaw)}`,
    );
  }
  const database = get(env, `${prefix}_DATABASE`) ?? fromUrl.database;
  if (database === undefined) {
    throw new ConfigError(`${prefix}_DATABASE is required (or set ${prefix}_URL)`);
  }
  const user = get(env, `${prefix}_USER`) ?? fromUrl.user;
  if (user === undefined) {
    throw new ConfigError(`${prefix}_USER is required (or set ${prefix}_URL)`);
  }
  // A password is taken verbatim (no trim: spaces may be part of it).
  const password = env[`${prefix}_PASSWORD`] || fromUrl.password || undefined;
  const sslName =
    get(env, `${prefix}_SSLMODE`) !== undefined ? `${prefix}_SSLMODE` : `${prefix}_URL sslmode`;
  const sslmode = sslMode(sslName, get(env, `${prefix}_SSLMODE`) ?? fromUrl.sslmode, 'prefer');
  const certName =
    get(env, `${prefix}_SSLROOTCERT`) !== undefined
      ? `${prefix}_SSLROOTCERT`
      : `${prefix}_URL sslrootcert`;
  const certPath = get(env, `${prefix}_SSLROOTCERT`) ?? fromUrl.sslRootCert;
  let sslRootCert: string | undefined;
  if (certPath !== undefined) {
    try {
      sslRootCert = readFileSync(certPath, 'utf8');
    } catch (error) {
      throw new ConfigError(
        `${certName} cannot be read: ${(error as NodeJS.ErrnoException).code ?? 'error'} ${certPath}`,
      );
    }
  }
  return Object.freeze({
    host,
    port: Number(portRaw),
    database,
    user,
    password,
    sslmode,
    sslRootCert,
  });
}

function parseUrl(name: string, raw: string): Partial<Record<keyof ConnectionConfig, string>> {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    // Never echo the value: it may hold a password.
    throw new ConfigError(
      `${name} is not a valid URL (expected postgres://user:password@host:port/database)`,
    );
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') {
    throw new ConfigError(`${name} must start with postgres:// or postgresql://`);
  }
  const out: Partial<Record<keyof ConnectionConfig, string>> = {};
  const socketHost = url.searchParams.get('host');
  if (socketHost) out.host = socketHost;
  else if (url.hostname) out.host = decode(name, 'host', url.hostname.replace(/^\[|\]$/g, ''));
  if (url.port) out.port = url.port;
  const database = decode(name, 'database', url.pathname.replace(/^\//, ''));
  if (database) out.database = database;
  if (url.username) out.user = decode(name, 'user', url.username);
  if (url.password) out.password = decode(name, 'password', url.password);
  const ssl = url.searchParams.get('sslmode');
  if (ssl) out.sslmode = ssl;
  const rootCert = url.searchParams.get('sslrootcert');
  if (rootCert) out.sslRootCert = rootCert;
  return out;
}

/** Percent-decoding that fails with the variable's name and never the value. */
function decode(name: string, part: string, raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new ConfigError(`${name} has an invalid percent-encoding in its ${part}`);
  }
}

function identifier(env: Env, name: string, fallback: string): string {
  const value = get(env, name) ?? fallback;
  if (!IDENTIFIER.test(value)) {
    throw new ConfigError(
      `${name} must match /^[a-z_][a-z0-9_]{0,62}$/ (lower-case letters, digits, underscore), got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

function tables(env: Env, name: string): string[] {
  const raw = get(env, name);
  if (raw === undefined) return [];
  const list = raw
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t !== '');
  for (const table of list) {
    if (!TABLE_NAME.test(table)) {
      throw new ConfigError(
        `${name} must be a comma-separated list of tables like public.orders, got ${JSON.stringify(table)}`,
      );
    }
  }
  return list;
}

export function loadConfig(env: Env = process.env): Config {
  const slot = identifier(env, 'PHILOTES_CDC_REPLICATION_SLOT', 'philotes_cdc');
  const publication = identifier(env, 'PHILOTES_CDC_PUBLICATION', 'philotes_pub');
  const id = get(env, 'PHILOTES_CDC_SOURCE_ID') ?? slot;
  if (!SOURCE_ID.test(id)) {
    throw new ConfigError(
      `PHILOTES_CDC_SOURCE_ID must be 1-128 characters of letters, digits, '_', '.' or '-', got ${JSON.stringify(id)}`,
    );
  }
  const source: SourceConfig = Object.freeze({
    id,
    connection: connection(env, 'PHILOTES_CDC_SOURCE'),
    slot,
    publication,
    tables: Object.freeze(tables(env, 'PHILOTES_CDC_TABLES')),
  });

  const logLevel = get(env, 'PHILOTES_LOG_LEVEL') ?? 'info';
  if (!(LOG_LEVELS as readonly string[]).includes(logLevel)) {
    throw new ConfigError(
      `PHILOTES_LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(logLevel)}`,
    );
  }
  const restartMinDelayMs = duration(env, 'PHILOTES_RESTART_MIN_DELAY', '500ms', 10, 3_600_000);
  const restartMaxDelayMs = duration(env, 'PHILOTES_RESTART_MAX_DELAY', '30s', 10, 3_600_000);
  if (restartMaxDelayMs < restartMinDelayMs) {
    throw new ConfigError(
      'PHILOTES_RESTART_MAX_DELAY must not be less than PHILOTES_RESTART_MIN_DELAY',
    );
  }

  return Object.freeze({
    sources: Object.freeze([source]),
    buffer: connection(env, 'PHILOTES_BUFFER'),
    checkpointIntervalMs: duration(env, 'PHILOTES_CDC_CHECKPOINT_INTERVAL', '10s', 10, 3_600_000),
    sourceTimeoutMs: duration(env, 'PHILOTES_CDC_SOURCE_TIMEOUT', '30s', 1000, 3_600_000),
    batchMaxRows: integer(env, 'PHILOTES_CDC_BATCH_MAX_ROWS', 5000, 1, 1_000_000),
    batchMaxBytes: integer(
      env,
      'PHILOTES_CDC_BATCH_MAX_BYTES',
      4 * 1024 * 1024,
      1024,
      256 * 1024 * 1024,
    ),
    batchMaxWaitMs: duration(env, 'PHILOTES_CDC_BATCH_MAX_WAIT', '0ms', 0, 60_000),
    maxInFlightBatches: integer(env, 'PHILOTES_CDC_MAX_IN_FLIGHT_BATCHES', 4, 1, 64),
    metricsPort: integer(env, 'PHILOTES_METRICS_PORT', 9753, 0, 65535),
    metricsHost: get(env, 'PHILOTES_METRICS_HOST') ?? '0.0.0.0',
    logLevel: logLevel as Config['logLevel'],
    shutdownTimeoutMs: duration(env, 'PHILOTES_SHUTDOWN_TIMEOUT', '10s', 100, 600_000),
    restartMinDelayMs,
    restartMaxDelayMs,
    readinessGraceMs: duration(env, 'PHILOTES_READINESS_GRACE', '60s', 1000, 86_400_000),
  });
}
