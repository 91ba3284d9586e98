/**
 * Retryable versus fatal, decided in one place. A retryable error restarts the reader with
 * backoff; a fatal one stops that source and is reported plainly, because retrying cannot fix it.
 */
import type { ErrorInfo } from './protocol.js';

/** Why a source stopped for good; each has its row in docs/operations.md's fatal-state table (test/unit/docs.test.ts) and its policy in error-policy.ts. */
export type FatalCode =
  | 'WAL_LEVEL_NOT_LOGICAL'
  | 'SERVER_TOO_OLD'
  | 'NO_REPLICATION_ATTRIBUTE'
  | 'NO_PRIVILEGE'
  | 'NO_FREE_SLOT'
  | 'TABLE_MISSING'
  | 'KEYLESS_TABLES'
  | 'SLOT_WRONG_KIND'
  | 'SLOT_WRONG_DATABASE'
  | 'SLOT_MISSING'
  | 'SLOT_ADVANCED'
  | 'SLOT_INVALIDATED'
  | 'WAL_REMOVED'
  | 'PUBLICATION_MISSING'
  | 'SOURCE_DIVERGED'
  | 'SOURCE_REPLACED'
  | 'VALUE_UNENCODABLE'
  | 'TRANSACTION_TOO_LARGE'
  | 'DDL_TRIGGER_MISSING';

/** Errors a person has to fix: configuration, privileges, server settings, a lost slot. */
export class FatalSourceError extends Error {
  override name = 'FatalSourceError';
  constructor(
    message: string,
    readonly code: FatalCode,
    /** Structured facts for logs and /readyz (positions, sizes); never secrets. */
    readonly details?: Readonly<Record<string, string | number | boolean | null>>,
  ) {
    super(message);
  }
}

/** SQLSTATEs that retrying cannot fix. */
const FATAL_SQLSTATES = new Set([
  '28000', // invalid_authorization_specification (pg_hba rejects us)
  '28P01', // invalid_password
  '3D000', // invalid_catalog_name: the database does not exist
  '42501', // insufficient_privilege
  '42704', // undefined_object (a configured table does not exist)
  '42P01', // undefined_table
  '55000', // object_not_in_prerequisite_state: wal_level, invalidated slot
]);

/** Node error codes that mean "could not reach the server", which may come back. */
const RETRYABLE_NODE_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
]);

export function isFatal(error: unknown): boolean {
  if (error instanceof FatalSourceError) return true;
  if (typeof error === 'object' && error !== null) {
    const fatal = (error as { fatal?: unknown }).fatal;
    if (typeof fatal === 'boolean') return fatal;
    const code = (error as { code?: unknown }).code;
    if (typeof code === 'string') {
      if (RETRYABLE_NODE_CODES.has(code)) return false;
      return FATAL_SQLSTATES.has(code);
    }
  }
  // Unknown errors (connection terminated, protocol surprises) are retried: the checkpoint makes
  // a restart safe, and a persistent fault shows up as a climbing restart count.
  return false;
}

export function toErrorInfo(error: unknown): ErrorInfo {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    const details = (error as { details?: ErrorInfo['details'] }).details;
    return {
      name: error.name,
      message: error.message,
      ...(typeof code === 'string' ? { code } : {}),
      ...(details !== undefined ? { details } : {}),
      fatal: isFatal(error),
      ...(error.stack !== undefined ? { stack: error.stack } : {}),
    };
  }
  return { name: 'Error', message: String(error), fatal: false };
}

/** The replication connection was silent for longer than the source timeout. */
export class SourceTimeoutError extends Error {
  override name = 'SourceTimeoutError';
  readonly code = 'SOURCE_TIMEOUT';
  constructor(silentMs: number) {
    super(`no message from the source for ${Math.round(silentMs / 1000)}s; reconnecting`);
  }
}

/** The supervisor gave up on a reader run (it stores nothing more from it). */
export class ReaderAbortedError extends Error {
  override name = 'AbortError';
  constructor() {
    super('reader aborted by the supervisor');
  }
}

/** An error that says what happened in our words, with a code, and keeps the original. */
class ExplainedError extends Error {
  constructor(
    message: string,
    readonly code: string,
    cause: unknown,
  ) {
    super(message, { cause });
  }
}

/** A connection failure that says what failed where; keeps the driver's code and error. */
export class ConnectionError extends ExplainedError {
  override name = 'ConnectionError';
}

/** The reader thread itself failed (its heap limit): retried, the thread is a new one. */
export class ReaderThreadError extends ExplainedError {
  override name = 'ReaderThreadError';
}

/** An error rebuilt on the supervisor side from what a thread reported. */
export class ReaderError extends Error {
  readonly code: string | undefined;
  readonly fatal: boolean;
  readonly details: ErrorInfo['details'];
  constructor(info: ErrorInfo) {
    super(info.message);
    this.name = info.name;
    this.code = info.code;
    this.details = info.details;
    this.fatal = info.fatal;
    if (info.stack !== undefined) this.stack = info.stack;
  }
}

/**
 * A connection failure rewritten to say what failed and where ("connect timeout to source
 * 10.0.0.5:5432"), keeping its code so that the classification above still applies. Other
 * errors pass through unchanged.
 */
export function describeConnectionError(
  error: unknown,
  what: 'source' | 'buffer',
  host: string,
  port: number,
): unknown {
  if (!(error instanceof Error)) return error;
  const code = (error as { code?: unknown }).code;
  const at = `${what} ${host}:${port}`;
  let text: string | null = null;
  if (code === 'ECONNREFUSED') text = `connection refused by ${at} (is the server running?)`;
  else if (code === 'ENOTFOUND' || code === 'EAI_AGAIN')
    text = `cannot resolve the ${what} host "${host}" (${String(code)})`;
  else if (code === 'ETIMEDOUT' || /connection timeout|timeout expired/i.test(error.message))
    text = `connect timeout to ${at}`;
  else if (code === 'EHOSTUNREACH' || code === 'ENETUNREACH')
    text = `${at} is unreachable (${String(code)})`;
  else if (code === 'ECONNRESET' || /Connection terminated unexpectedly/.test(error.message))
    text = `connection to ${at} was closed unexpectedly`;
  if (text === null) return error;
  return new ConnectionError(
    `${text}: ${error.message}`,
    typeof code === 'string' ? code : 'CONNECTION_FAILED',
    error,
  );
}

export type BufferProblem =
  | 'unreachable'
  | 'read-only'
  | 'disk-full'
  | 'out-of-connections'
  | 'credentials'
  | 'missing-database'
  | 'privilege'
  | 'other';

/** What a buffer error means for an operator, and whether waiting can fix it. */
export interface BufferErrorClass {
  readonly problem: BufferProblem;
  readonly retry: boolean;
  /** One sentence, without the driver's message (log that under `err`). */
  readonly summary: string;
}

const BUFFER_SQLSTATES: Record<string, Omit<BufferErrorClass, 'retry'> & { retry: boolean }> = {
  '28P01': {
    problem: 'credentials',
    retry: false,
    // The setting that gave it is added where the configuration is known (passwordSource).
    summary: 'the buffer database rejected the password',
  },
  '28000': {
    problem: 'credentials',
    retry: false,
    summary: 'the buffer database refused the connection (pg_hba.conf or the user)',
  },
  '3D000': {
    problem: 'missing-database',
    retry: false,
    summary: 'the buffer database does not exist (create it, or fix PHILOTES_BUFFER_DATABASE)',
  },
  '42501': {
    problem: 'privilege',
    retry: false,
    summary:
      "the buffer user lacks a privilege Philotes needs (CREATE on the buffer's schema for the first start, then INSERT, UPDATE, DELETE and SELECT on its tables)",
  },
  '25006': {
    problem: 'read-only',
    retry: true,
    summary:
      'the buffer database is read-only (default_transaction_read_only, or a standby): waiting for it to accept writes',
  },
  '53100': {
    problem: 'disk-full',
    retry: true,
    summary: "the buffer database's disk is full: waiting for space",
  },
  '53300': {
    problem: 'out-of-connections',
    retry: true,
    summary: 'the buffer database has no connection slot free (max_connections): waiting for one',
  },
  '53200': {
    problem: 'other',
    retry: true,
    summary: 'the buffer database is out of memory: retrying',
  },
  '57P03': {
    problem: 'unreachable',
    retry: true,
    summary: 'the buffer database is starting up or shutting down: waiting for it',
  },
};

/** "(from buffer.passwordEnv (BUFFER_PASSWORD))": which setting a rejected password came from. */
export function passwordSource(conn: { readonly passwordSetting?: string | undefined }): string {
  return conn.passwordSetting === undefined
    ? '(no password is set: give one with password, passwordEnv or passwordFile)'
    : `(from ${conn.passwordSetting})`;
}

export function classifyBufferError(error: unknown): BufferErrorClass {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    const known = BUFFER_SQLSTATES[code];
    if (known) return known;
    if (RETRYABLE_NODE_CODES.has(code) || code === 'CONNECTION_FAILED' || code.startsWith('08'))
      return {
        problem: 'unreachable',
        retry: true,
        summary: 'the buffer database is not reachable yet',
      };
    if (code === '57P01' || code === '57P02')
      return {
        problem: 'unreachable',
        retry: true,
        summary: 'the buffer database went away: waiting for it',
      };
  }
  const message = error instanceof Error ? error.message : String(error);
  if (/timeout|terminated|ECONN|closed/i.test(message)) {
    return {
      problem: 'unreachable',
      retry: true,
      summary: 'the buffer database is not reachable yet',
    };
  }
  return { problem: 'other', retry: !isFatal(error), summary: 'the buffer database failed' };
}
