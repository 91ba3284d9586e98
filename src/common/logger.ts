/**
 * One pino root per thread. Secrets never reach a log line: connection settings are logged
 * through `safeConnection`, and `redact` catches a password that slips into an object anyway.
 */
import { pino, type Logger } from 'pino';
import type { ConnectionConfig } from './config.js';

export type { Logger };

/** @param fd where the JSON lines go: stdout, or stderr for commands whose stdout is a report. */
export function createLogger(
  level: string,
  base: Record<string, unknown> = {},
  fd: 1 | 2 = 1,
): Logger {
  const options = {
    level,
    base: { pid: process.pid, ...base },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: {
      paths: ['password', '*.password', '*.*.password', 'connection.password', 'config.*.password'],
      censor: '[redacted]',
    },
    formatters: { level: (label: string) => ({ level: label }) },
  };
  return fd === 1 ? pino(options) : pino(options, pino.destination({ fd, sync: true }));
}

export function safeConnection(conn: ConnectionConfig): Record<string, unknown> {
  return {
    host: conn.host,
    port: conn.port,
    database: conn.database,
    user: conn.user,
    sslmode: conn.sslmode,
  };
}
