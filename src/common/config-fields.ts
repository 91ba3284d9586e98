/**
 * The checks behind the configuration, shared by the environment and the file: each reads one
 * setting from a flat map of raw strings, validates it, and names it exactly in its message
 * (never echoing a password or a URL, which may carry one). Which setting uses which check, and
 * its default: config-registry.ts.
 */
import { readFileSync } from 'node:fs';
import type {
  ConnectionConfig,
  Env,
  KeylessTables,
  SnapshotMode,
  SslMode,
} from './config-types.js';

export type { Env, KeylessTables, SnapshotMode } from './config-types.js';

/** A bad configuration: every problem found, each a line naming the setting. */
export class ConfigError extends Error {
  override name = 'ConfigError';
  readonly problems: readonly string[];
  constructor(problems: string | readonly string[]) {
    const list = typeof problems === 'string' ? [problems] : problems;
    super(list.join('\n'));
    this.problems = list;
  }
}

/** Collects the ConfigErrors of independent checks, so that all are reported at once. */
export class Problems {
  readonly list: string[] = [];
  /** Runs `check`; a ConfigError is recorded (undefined returned), anything else thrown. */
  attempt<T>(check: () => T): T | undefined {
    try {
      return check();
    } catch (error) {
      if (!(error instanceof ConfigError)) throw error;
      this.list.push(...error.problems);
      return undefined;
    }
  }
  add(problem: string): void {
    this.list.push(problem);
  }
  throwIfAny(): void {
    if (this.list.length > 0) throw new ConfigError(this.list);
  }
}

/** Slot and publication names are interpolated into replication commands: keep them plain. */
const IDENTIFIER = /^[a-z_][a-z0-9_]{0,62}$/;
const SOURCE_ID = /^[A-Za-z0-9_.-]{1,128}$/;
const TABLE_NAME = /^([A-Za-z_][A-Za-z0-9_$]*\.)?[A-Za-z_][A-Za-z0-9_$]*$/;
const SSL_MODES: readonly SslMode[] = ['disable', 'prefer', 'require', 'verify-ca', 'verify-full'];

export function get(env: Env, name: string): string | undefined {
  const value = env[name];
  if (value === undefined) return undefined;
  const trimmed = value.trim();
  return trimmed === '' ? undefined : trimmed;
}

export function parseDuration(name: string, raw: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$/.exec(raw);
  if (!match) {
    throw new ConfigError(
      `${name} must be a duration like 500ms, 10s, 1m, 2h or 7d, got ${JSON.stringify(raw)}`,
    );
  }
  const value = Number(match[1]);
  const unit = match[2] ?? 's';
  const factor =
    unit === 'ms'
      ? 1
      : unit === 's'
        ? 1000
        : unit === 'm'
          ? 60_000
          : unit === 'h'
            ? 3_600_000
            : 86_400_000;
  return Math.round(value * factor);
}

export function duration(
  env: Env,
  name: string,
  fallback: string,
  min: number,
  max: number,
): number {
  const raw = get(env, name) ?? fallback;
  const ms = parseDuration(name, raw);
  if (ms < min || ms > max) {
    throw new ConfigError(
      `${name} must be between ${formatMs(min)} and ${formatMs(max)}, got ${JSON.stringify(raw)}`,
    );
  }
  return ms;
}

/** "10s", "500ms", "5m": a duration as the settings are written. */
export function formatMs(ms: number): string {
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0 && ms > 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

export function integer(
  env: Env,
  name: string,
  fallback: number,
  min: number,
  max: number,
): number {
  const raw = get(env, name);
  if (raw === undefined) return fallback;
  if (!/^\d+$/.test(raw) || Number(raw) < min || Number(raw) > max) {
    throw new ConfigError(
      `${name} must be an integer between ${min} and ${max}, got ${JSON.stringify(raw)}`,
    );
  }
  return Number(raw);
}

/** on/off, true/false, yes/no or 1/0. */
export function flag(env: Env, name: string, fallback: boolean): boolean {
  const raw = get(env, name);
  if (raw === undefined) return fallback;
  const value = raw.toLowerCase();
  if (['on', 'true', 'yes', '1'].includes(value)) return true;
  if (['off', 'false', 'no', '0'].includes(value)) return false;
  throw new ConfigError(`${name} must be on or off (true/false), got ${JSON.stringify(raw)}`);
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

/** The settings of a connection; how each is named in messages depends on where it came from. */
export type ConnectionField =
  'url' | 'host' | 'port' | 'database' | 'user' | 'password' | 'sslmode' | 'sslRootCert';

/** `PHILOTES_BUFFER` → PHILOTES_BUFFER_URL, PHILOTES_BUFFER_HOST, … PHILOTES_BUFFER_SSLROOTCERT. */
export function envNames(prefix: string): (field: ConnectionField) => string {
  return (field) => `${prefix}_${field.toUpperCase()}`;
}

/**
 * Reads the `url` setting if set (the individual settings then override its parts), otherwise
 * host, port, database, user, password, sslmode, sslRootCert. `name` maps each setting to the
 * key it is read under in `env`, which is also how messages name it.
 */
export function connection(env: Env, name: (field: ConnectionField) => string): ConnectionConfig {
  let fromUrl: Partial<Record<keyof ConnectionConfig, string>> = {};
  const url = get(env, name('url'));
  if (url !== undefined) fromUrl = parseUrl(name('url'), url);

  const host = get(env, name('host')) ?? fromUrl.host ?? 'localhost';
  const portFromUrl = get(env, name('port')) === undefined;
  const portName = portFromUrl ? name('url') : name('port');
  const portRaw = get(env, name('port')) ?? fromUrl.port ?? '5432';
  if (!/^\d+$/.test(portRaw) || Number(portRaw) < 1 || Number(portRaw) > 65535) {
    throw new ConfigError(
      portFromUrl
        ? `${portName} has an invalid port: it must be an integer between 1 and 65535`
        : `${portName} must be an integer between 1 and 65535, got ${JSON.stringify(portRaw)}`,
    );
  }
  const database = get(env, name('database')) ?? fromUrl.database;
  if (database === undefined) {
    throw new ConfigError(`${name('database')} is required (or set ${name('url')})`);
  }
  const user = get(env, name('user')) ?? fromUrl.user;
  if (user === undefined) {
    throw new ConfigError(`${name('user')} is required (or set ${name('url')})`);
  }
  // A password is taken verbatim (no trim: spaces may be part of it).
  const password = env[name('password')] || fromUrl.password || undefined;
  const sslName =
    get(env, name('sslmode')) !== undefined ? name('sslmode') : `${name('url')} sslmode`;
  const sslmode = sslMode(sslName, get(env, name('sslmode')) ?? fromUrl.sslmode, 'prefer');
  const certName =
    get(env, name('sslRootCert')) !== undefined
      ? name('sslRootCert')
      : `${name('url')} sslrootcert`;
  const certPath = get(env, name('sslRootCert')) ?? fromUrl.sslRootCert;
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
    sslRootCertFile: certPath,
    passwordSetting: env[name('password')]
      ? name('password')
      : fromUrl.password
        ? name('url')
        : undefined,
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

export function identifier(env: Env, name: string, fallback: string): string {
  const value = get(env, name) ?? fallback;
  if (!IDENTIFIER.test(value)) {
    throw new ConfigError(
      `${name} must match /^[a-z_][a-z0-9_]{0,62}$/ (lower-case letters, digits, underscore), got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

/** A source's id: the buffer keys its events, checkpoint and history by it. */
export function sourceId(env: Env, name: string, fallback: string): string {
  const id = get(env, name) ?? fallback;
  if (!SOURCE_ID.test(id)) {
    throw new ConfigError(
      `${name} must be 1-128 characters of letters, digits, '_', '.' or '-', got ${JSON.stringify(id)}`,
    );
  }
  return id;
}

/** A comma-separated list, items trimmed, empty ones dropped. */
function commaList(env: Env, name: string): string[] {
  const raw = get(env, name);
  if (raw === undefined) return [];
  return raw
    .split(',')
    .map((item) => item.trim())
    .filter((item) => item !== '');
}

/** Logical message prefixes: a comma-separated list (a file gives an array). */
export function prefixes(env: Env, name: string): string[] {
  const list = commaList(env, name);
  for (const prefix of list) {
    if (prefix.includes('\0')) throw new ConfigError(`${name} must not contain a NUL character`);
  }
  return list;
}

/** When a source copies the rows its tables already hold (see docs/snapshots.md). */
export function snapshotMode(env: Env, name: string): SnapshotMode {
  const raw = get(env, name);
  if (raw === undefined) return 'initial';
  if (raw === 'initial' || raw === 'never' || raw === 'when_needed') return raw;
  throw new ConfigError(
    `${name} must be initial, never or when_needed, got ${JSON.stringify(raw)}`,
  );
}

const KEYLESS_TABLES: readonly KeylessTables[] = ['block', 'leave_out', 'identity_full', 'accept'];

export function keylessTables(env: Env, name: string): KeylessTables {
  const raw = get(env, name);
  if (raw === undefined) return 'block';
  const found = KEYLESS_TABLES.find((k) => k === raw);
  if (found !== undefined) return found;
  throw new ConfigError(
    `${name} must be block, leave_out, identity_full or accept, got ${JSON.stringify(raw)}`,
  );
}

/** pgoutput's protocol version: 1, 2 (streams large transactions in progress), or auto. */
export function protocolVersion(env: Env, name: string): 1 | 2 | null {
  const raw = get(env, name);
  if (raw === undefined || raw.toLowerCase() === 'auto') return null;
  if (raw === '1') return 1;
  if (raw === '2') return 2;
  throw new ConfigError(`${name} must be 1, 2 or auto, got ${JSON.stringify(raw)}`);
}

export function tables(env: Env, name: string): string[] {
  const list = commaList(env, name);
  for (const table of list) {
    if (!TABLE_NAME.test(table)) {
      throw new ConfigError(
        `${name} must be a comma-separated list of tables like public.orders, got ${JSON.stringify(table)}`,
      );
    }
  }
  return list;
}
