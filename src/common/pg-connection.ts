/** Connection settings as the pg driver takes them, from a validated ConnectionConfig. */
import type { ConnectionOptions } from 'node:tls';
import type { ConnectionConfig, SslMode } from './config.js';

/** pg client options for a connection; `application_name` shows Philotes in pg_stat_activity. */
export function pgClientOptions(conn: ConnectionConfig, applicationName: string) {
  return {
    host: conn.host,
    port: conn.port,
    database: conn.database,
    user: conn.user,
    password: conn.password,
    application_name: applicationName,
    ssl: sslOption(conn.sslmode, conn.sslRootCert),
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
