/**
 * Retryable versus fatal, decided in one place. A retryable error restarts the reader with
 * backoff; a fatal one stops that source and is reported plainly, because retrying cannot fix it.
 */
import type { ErrorInfo } from './protocol.js';

/** Errors a person has to fix: configuration, privileges, server settings, a lost slot. */
export class FatalSourceError extends Error {
  override name = 'FatalSourceError';
  constructor(
    message: string,
    readonly code: string,
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
