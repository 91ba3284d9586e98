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

/**
 * For the one-shot commands a person runs (check, status, reset-source…): their log lines go to
 * stderr as "philotes: warning: …" sentences, not JSON, so that a terminal shows human output
 * only; the JSON fields that matter (a table, a position) follow the sentence as key=value.
 */
export function createCommandLogger(level: string): Logger {
  const skip = new Set(['level', 'time', 'pid', 'msg', 'hostname']);
  const human = {
    write(line: string): void {
      let entry: Record<string, unknown>;
      try {
        entry = JSON.parse(line) as Record<string, unknown>;
      } catch {
        process.stderr.write(line);
        return;
      }
      const label = entry['level'] === 'warn' ? 'warning' : String(entry['level']);
      const err = entry['err'] as { message?: unknown } | undefined;
      const facts = Object.entries(entry)
        .filter(([key]) => !skip.has(key) && key !== 'err')
        .map(
          ([key, value]) => `${key}=${typeof value === 'string' ? value : JSON.stringify(value)}`,
        );
      const text = [
        String(entry['msg'] ?? ''),
        err?.message === undefined ? null : String(err.message),
        facts.length > 0 ? `(${facts.join(' ')})` : null,
      ]
        .filter((x) => x !== null && x !== '')
        .join(': ');
      process.stderr.write(`philotes: ${label}: ${text.replace(/\s*\n\s*/g, ' ')}\n`);
    },
  };
  return pino(
    {
      level,
      base: {},
      redact: {
        paths: [
          'password',
          '*.password',
          '*.*.password',
          'connection.password',
          'config.*.password',
        ],
        censor: '[redacted]',
      },
      formatters: { level: (label: string) => ({ level: label }) },
    },
    human,
  );
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
