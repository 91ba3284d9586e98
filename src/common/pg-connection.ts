/**
 * Connection settings as the pg driver takes them, from a validated ConnectionConfig. Secrets that
 * live in files (a Kubernetes secret, a CA bundle) are read here, when a connection is made, not
 * once at start: a rotated file is used at the next attempt.
 */
import { readFileSync } from 'node:fs';
import type { ConnectionOptions } from 'node:tls';
import type { ConnectionConfig, SslMode } from './config.js';

/** pg client options for a connection; `application_name` shows Philotes in pg_stat_activity. */
export function pgClientOptions(conn: ConnectionConfig, applicationName: string) {
  return {
    host: conn.host,
    port: conn.port,
    database: conn.database,
    user: conn.user,
    password:
      conn.passwordFile === undefined
        ? conn.password
        : // pg calls it at every connect (pools and reconnects included).
          () => readSecret(conn.passwordFile!, conn.password),
    application_name: applicationName,
    ssl: sslOption(conn.sslmode, readFileOr(conn.sslRootCertFile, conn.sslRootCert)),
    connectionTimeoutMillis: 10_000,
  };
}

function sslOption(mode: SslMode, ca: string | undefined): false | ConnectionOptions {
  switch (mode) {
    case 'disable':
      return false;
    // node-postgres cannot fall back from TLS to plain; 'prefer' therefore means plain, like
    // libpq against a server without TLS (the common case for loopback and sidecars).
    case 'prefer':
      return false;
    case 'require':
      return { rejectUnauthorized: false };
    case 'verify-ca':
      // The chain is checked, the host name is not (libpq's meaning of verify-ca).
      return {
        rejectUnauthorized: true,
        ...(ca ? { ca } : {}),
        checkServerIdentity: () => undefined,
      };
    case 'verify-full':
      return { rejectUnauthorized: true, ...(ca ? { ca } : {}) };
  }
}

/**
 * A password file's content without its trailing newline (echo > file, most secret tools). While
 * the file cannot be read (a secret being swapped), the last password known is used: the attempt
 * then fails or succeeds as it would have, and the next one reads the file again.
 */
function readSecret(path: string, fallback: string | undefined): string {
  const text = readFileOr(path, undefined);
  return text === undefined ? (fallback ?? '') : text.replace(/\r?\n$/, '');
}

function readFileOr(path: string | undefined, fallback: string | undefined): string | undefined {
  if (path === undefined) return fallback;
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return fallback;
  }
}
