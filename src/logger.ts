/**
 * One pino root per thread. Secrets never reach a log line: connection settings are logged
 * through `safeConnection`, and `redact` catches a password that slips into an object anyway.
 */
import { pino, type Logger } from 'pino';
import type { ConnectionConfig } from './config.js';

export type { Logger };

export function createLogger(level: string, base: Record<string, unknown> = {}): Logger {
  return pino({
    level,
    base: { pid: process.pid, ...base },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: {
      paths: ['password', '*.password', '*.*.password', 'connection.password', 'config.*.password'],
      censor: '[redacted]',
    },
    formatters: { level: (label) => ({ level: label }) },
  });
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
