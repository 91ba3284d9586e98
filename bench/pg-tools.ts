/** PostgreSQL client tools (pgbench, pg_recvlogical) for the benchmarks. */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Cluster } from '../test/support/cluster.js';

const execFileAsync = promisify(execFile);

export function binDir(): string {
  const fromEnv = process.env['PHILOTES_PG_BIN'];
  if (fromEnv) return fromEnv;
  const debian = '/usr/lib/postgresql/15/bin';
  if (existsSync(join(debian, 'pg_recvlogical'))) return debian;
  throw new Error(
    'PostgreSQL client tools not found: install postgresql-15 or set PHILOTES_PG_BIN',
  );
}

/** Runs a client tool to completion; rejects with its stderr on failure. */
export async function runTool(
  file: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<string> {
  try {
    const { stdout } = await execFileAsync(file, args, {
      env: { ...process.env, ...env },
      maxBuffer: 64 * 1024 * 1024,
    });
    return stdout;
  } catch (error) {
    const e = error as { stderr?: string; message: string };
    throw new Error(`${file} failed: ${e.stderr?.trim() || e.message}`, { cause: error });
  }
}

/** Runs pgbench against a cluster's database with the given options. */
export function pgbench(source: Cluster, args: string[], database = 'app'): Promise<string> {
  return runTool(
    join(binDir(), 'pgbench'),
    ['-h', source.host, '-p', String(source.port), '-U', source.user, ...args, database],
    { PGPASSWORD: source.password },
  );
}
