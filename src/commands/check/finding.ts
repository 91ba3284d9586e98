/**
 * What every check reports: a finding per thing checked, ok, a warning (Philotes runs, but
 * something needs a look) or a blocker (the source, or everything, cannot capture), with how to
 * fix it; and the connection each check runs on.
 */
import pg from 'pg';
import type { ConnectionConfig } from '../../common/config.js';
import type { FatalCode } from '../../common/errors.js';
import { describeConnectionError, passwordSource } from '../../common/errors.js';
import { pgClientOptions } from '../../common/pg-connection.js';

export type Verdict = 'ok' | 'warning' | 'blocker';

export interface Finding {
  /** `buffer`, or the source's id. */
  readonly target: string;
  readonly check: string;
  readonly verdict: Verdict;
  readonly detail: string;
  /** What to do about it, for a warning or a blocker. */
  readonly fix: string | null;
  /** For a blocker a run would stop on: the fatal code it would stop with (error-policy.ts). */
  readonly code?: FatalCode | undefined;
}

/** Adds a finding for the check's target. */
export type AddFinding = (f: Omit<Finding, 'target'>) => void;

/** 0 all ok, 1 warnings, 2 blockers: the exit code of `check`. */
export function exitCode(findings: readonly Finding[]): number {
  if (findings.some((f) => f.verdict === 'blocker')) return 2;
  if (findings.some((f) => f.verdict === 'warning')) return 1;
  return 0;
}

/** Runs `body` on a fresh connection; a connection failure becomes the blocker it is. */
export async function withClient(
  target: string,
  side: 'source' | 'buffer',
  conn: ConnectionConfig,
  body: (client: pg.Client, add: (f: Omit<Finding, 'target'>) => void) => Promise<void>,
): Promise<Finding[]> {
  const findings: Finding[] = [];
  const add = (f: Omit<Finding, 'target'>) => findings.push({ target, ...f });
  const client = new pg.Client(pgClientOptions(conn, 'philotes:check'));
  client.on('error', () => undefined); // a lost connection rejects the query in flight
  try {
    await client.connect();
  } catch (error) {
    const described = describeConnectionError(error, side, conn.host, conn.port);
    add({
      check: 'connection',
      verdict: 'blocker',
      detail: described instanceof Error ? described.message : String(described),
      fix: connectionFix((error as { code?: string }).code, conn),
    });
    return findings;
  }
  try {
    const [version] = (
      await client.query<{ v: string }>(`SELECT current_setting('server_version') AS v`)
    ).rows;
    add({
      check: 'connection',
      verdict: 'ok',
      detail: `PostgreSQL ${version?.v ?? '?'} at ${conn.host}:${conn.port}/${conn.database} as ${conn.user}`,
      fix: null,
    });
    await body(client, add);
  } catch (error) {
    add({ check: 'queries', verdict: 'blocker', detail: (error as Error).message, fix: null });
  } finally {
    await client.end().catch(() => undefined);
  }
  return findings;
}

function connectionFix(code: string | undefined, conn: ConnectionConfig): string {
  switch (code) {
    case '28P01':
      return `check the password of user ${conn.user} ${passwordSource(conn)}`;
    case '28000':
      return `check the user and pg_hba.conf on ${conn.host}:${conn.port}`;
    case '3D000':
      return 'check the database name, or create the database';
    case 'ECONNREFUSED':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'ETIMEDOUT':
      return 'check host and port, and that the server runs and accepts connections from here';
    default:
      return 'see the message';
  }
}
