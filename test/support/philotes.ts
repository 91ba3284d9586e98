/**
 * Runs the built CLI (`node dist/src/main.js`) as a child process, the way an operator would,
 * and records everything it prints so tests can assert on the log lines as data.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { waitFor } from './poll.js';
import { onProcessEnd } from './process-end.js';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const PHILOTES_MAIN = join(REPO_ROOT, 'dist/src/main.js');

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** One parsed JSON log line. */
export type LogEntry = Record<string, unknown>;

export interface PhilotesProcess {
  readonly proc: ChildProcess;
  readonly pid: number;
  /** Complete stdout lines (the JSON logs), in order; grows while the process runs. */
  readonly stdout: string[];
  /** Complete stderr lines, in order. */
  readonly stderr: string[];
  /** Resolves once the process has exited and its output is fully read. Never rejects. */
  readonly exited: Promise<ExitStatus>;
  /** How it exited, once it has (and its output is fully read); null while it runs. */
  status(): ExitStatus | null;
  /** stdout lines that parse as JSON objects; other lines are skipped. */
  logs(): LogEntry[];
  signal(sig: NodeJS.Signals): boolean;
  kill9(): Promise<void>;
  /**
   * Resolves with the first log entry (already printed or yet to come) matching `predicate`.
   * Rejects at the timeout or when the process exits first.
   */
  waitForLog(predicate: (entry: LogEntry) => boolean, timeoutMs?: number): Promise<LogEntry>;
}

export interface StartOptions {
  /** Script to run instead of the built CLI; for testing this helper itself. */
  script?: string;
  args?: string[];
  /**
   * Start from the caller's whole environment (less any PHILOTES_* variable) instead of just
   * PATH and HOME: the demo runs Philotes as a user would.
   */
  inheritEnv?: boolean;
  /** Its own process group: a terminal's Ctrl-C reaches only the caller, which stops it. */
  detached?: boolean;
  /** Everything it prints is also written here, as it comes. */
  tee?: NodeJS.WritableStream;
}

export interface PhilotesRun extends ExitStatus {
  stdout: string[];
  stderr: string[];
}

const running = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // A worker left running would hold replication slots and keep writing after the test run.
  onProcessEnd(() => {
    for (const proc of running) proc.kill('SIGKILL');
  });
}

function parseLine(line: string): LogEntry | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const v: unknown = JSON.parse(line);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as LogEntry) : undefined;
  } catch {
    return undefined;
  }
}

/** Splits a stream into lines; a chunk may end mid-line, so the tail is carried over. */
function collectLines(stream: Readable, into: string[], onLine: (line: string) => void): void {
  let partial = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    for (const line of parts) {
      into.push(line);
      onLine(line);
    }
  });
  stream.on('end', () => {
    if (partial) {
      into.push(partial);
      onLine(partial);
      partial = '';
    }
  });
}

/**
 * Starts the CLI with `env` over a minimal environment (PATH, HOME): nothing from the test
 * runner's own environment leaks into the configuration under test.
 */
export function startPhilotes(
  env: Record<string, string>,
  opts: StartOptions = {},
): PhilotesProcess {
  const script = opts.script ?? PHILOTES_MAIN;
  if (!existsSync(script)) {
    throw new Error(`${script} does not exist: run \`npm run build\` first`);
  }
  installExitHook();
  const base: Record<string, string> = {};
  for (const [key, v] of Object.entries(process.env)) {
    const wanted = opts.inheritEnv
      ? !key.startsWith('PHILOTES_')
      : key === 'PATH' || key === 'HOME';
    if (wanted && v !== undefined) base[key] = v;
  }
  // Tests are about the stream unless they say otherwise: an initial snapshot of rows written
  // around the start would add SNAPSHOT events to their exact counts. The demo (inheritEnv)
  // runs as a user would.
  // (A configuration file says so itself, `defaults: { snapshot: never }`: the environment's
  // source settings would clash with it.)
  const fromFile = env['PHILOTES_CONFIG'] !== undefined || (opts.args ?? []).includes('--config');
  if (!opts.inheritEnv && !fromFile) base['PHILOTES_CDC_SNAPSHOT'] = 'never';
  const proc = spawn(process.execPath, [script, ...(opts.args ?? [])], {
    cwd: REPO_ROOT,
    env: { ...base, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: opts.detached ?? false,
  });
  if (opts.tee) {
    const tee = opts.tee;
    proc.stdout?.on('data', (chunk: string | Buffer) => tee.write(chunk));
    proc.stderr?.on('data', (chunk: string | Buffer) => tee.write(chunk));
  }
  running.add(proc);

  const stdout: string[] = [];
  const stderr: string[] = [];
  const lineListeners = new Set<(line: string) => void>();
  collectLines(proc.stdout as Readable, stdout, (line) => {
    for (const l of lineListeners) l(line);
  });
  collectLines(proc.stderr as Readable, stderr, () => undefined);

  let status: ExitStatus | undefined;
  const exited = new Promise<ExitStatus>((resolveExit) => {
    // 'close' (not 'exit') fires after the stdio pipes are drained, so the arrays are complete.
    proc.on('close', (code, signal) => {
      status = { code, signal };
      running.delete(proc);
      resolveExit(status);
    });
    proc.on('error', (err) => {
      // Spawn failure: 'close' may not follow, so settle here too.
      stderr.push(`spawn error: ${err.message}`);
      if (proc.pid === undefined) {
        status = { code: null, signal: null };
        running.delete(proc);
        resolveExit(status);
      }
    });
  });

  const logs = (): LogEntry[] =>
    stdout.map(parseLine).filter((e): e is LogEntry => e !== undefined);

  const waitForLog = (
    predicate: (entry: LogEntry) => boolean,
    timeoutMs = 30_000,
  ): Promise<LogEntry> =>
    new Promise<LogEntry>((resolveLog, reject) => {
      const found = logs().find(predicate);
      if (found) return resolveLog(found);
      const cleanup = (): void => {
        clearTimeout(timer);
        lineListeners.delete(onLine);
      };
      const onLine = (line: string): void => {
        const entry = parseLine(line);
        if (entry && predicate(entry)) {
          cleanup();
          resolveLog(entry);
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new Error(`timed out after ${timeoutMs}ms waiting for a log line${tail(stdout, stderr)}`),
        );
      }, timeoutMs);
      lineListeners.add(onLine);
      void exited.then((s) => {
        if (!lineListeners.has(onLine)) return;
        cleanup();
        reject(
          new Error(
            `philotes exited (code ${s.code}, signal ${s.signal}) before the log line appeared${tail(stdout, stderr)}`,
          ),
        );
      });
    });

  return {
    proc,
    pid: proc.pid ?? -1,
    stdout,
    stderr,
    exited,
    status: () => status ?? null,
    logs,
    signal: (sig) => (status ? false : proc.kill(sig)),
    kill9: async () => {
      if (!status) proc.kill('SIGKILL');
      await exited;
    },
    waitForLog,
  };
}

function tail(stdout: string[], stderr: string[]): string {
  return `\n--- last stdout ---\n${stdout.slice(-20).join('\n')}\n--- last stderr ---\n${stderr.slice(-20).join('\n')}`;
}

/** Runs the CLI until it exits by itself; SIGKILLs it and rejects after `timeoutMs`. */
export async function runPhilotesToExit(
  env: Record<string, string>,
  timeoutMs = 60_000,
  opts: StartOptions = {},
): Promise<PhilotesRun> {
  const p = startPhilotes(env, opts);
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((r) => {
    timer = setTimeout(() => r('timeout'), timeoutMs);
  });
  const result = await Promise.race([p.exited, timedOut]);
  clearTimeout(timer);
  if (result === 'timeout') {
    await p.kill9();
    throw new Error(`philotes did not exit within ${timeoutMs}ms${tail(p.stdout, p.stderr)}`);
  }
  return { ...result, stdout: p.stdout, stderr: p.stderr };
}

/** SIGKILLs every CLI process this test process started that is still running. */
export async function killAllPhilotes(): Promise<number> {
  const all = [...running];
  await Promise.all(
    all.map(
      (proc) =>
        new Promise<void>((r) => {
          if (proc.exitCode !== null || proc.signalCode !== null) {
            running.delete(proc);
            return r();
          }
          proc.once('close', () => r());
          proc.kill('SIGKILL');
        }),
    ),
  );
  return all.length;
}

/**
 * Log lines in which some object repeats a key. JSON.parse keeps the last of duplicate keys
 * without a word, but strict log pipelines reject such lines, so this scans them itself.
 */
export function linesWithDuplicateKeys(lines: readonly string[]): string[] {
  return lines.filter((line) => line.startsWith('{') && hasDuplicateKey(line));
}

function hasDuplicateKey(text: string): boolean {
  let i = 0;
  let duplicate = false;
  const ws = (): void => {
    while (i < text.length && ' \t\r\n'.includes(text[i]!)) i++;
  };
  const string = (): string => {
    const start = i;
    i++; // opening quote
    while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
    i++; // closing quote
    return JSON.parse(text.slice(start, i)) as string;
  };
  const value = (): void => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const keys = new Set<string>();
      ws();
      if (text[i] === '}') {
        i++;
        return;
      }
      for (;;) {
        ws();
        const key = string();
        if (keys.has(key)) duplicate = true;
        keys.add(key);
        ws();
        i++; // ':'
        value();
        ws();
        if (text[i++] === '}') return;
      }
    } else if (c === '[') {
      i++;
      ws();
      if (text[i] === ']') {
        i++;
        return;
      }
      for (;;) {
        value();
        ws();
        if (text[i++] === ']') return;
      }
    } else if (c === '"') {
      string();
    } else {
      while (i < text.length && !',}] \t\r\n'.includes(text[i]!)) i++;
    }
  };
  try {
    value();
  } catch {
    return false; // not JSON: not a log line this check is about
  }
  return duplicate;
}

export interface FailedSourceRun extends PhilotesRun {
  /** The process was still running when its failed source had been reported (it must be). */
  stillRunning: boolean;
  /** /readyz's body once it reported the source `failed`, if a metrics port was given. */
  readiness: { status: number; body: Record<string, unknown> } | null;
}

/**
 * Runs the CLI until a source fails for good: it says so in one stderr line and stays `failed`
 * (retried slowly) without ending the process. Then stops it with SIGTERM, which must end it.
 * With `metricsPort` (set PHILOTES_METRICS_PORT to it in `env`), also waits for /readyz to
 * report the source failed and returns what it said.
 */
export async function runUntilSourceFails(
  env: Record<string, string>,
  opts: StartOptions & { timeoutMs?: number; metricsPort?: number } = {},
): Promise<FailedSourceRun> {
  const p = startPhilotes(env, opts);
  const timeoutMs = opts.timeoutMs ?? 60_000;
  try {
    await waitFor(() => p.stderr.length > 0 || p.status() !== null, {
      what: 'a source to fail (a line on stderr)',
      timeoutMs,
    });
    let readiness: FailedSourceRun['readiness'] = null;
    if (opts.metricsPort !== undefined && p.status() === null) {
      readiness = await waitFor(
        async () => {
          const res = await fetch(`http://127.0.0.1:${opts.metricsPort}/readyz`, {
            signal: AbortSignal.timeout(5_000),
          });
          const body = (await res.json()) as { sources?: Array<{ state?: string }> };
          return body.sources?.some((s) => s.state === 'failed')
            ? { status: res.status, body: body as Record<string, unknown> }
            : false;
        },
        { what: '/readyz to report the source failed', timeoutMs },
      );
    }
    const stillRunning = p.status() === null;
    p.signal('SIGTERM');
    const status = await waitFor(() => p.exited, { what: 'exit after SIGTERM', timeoutMs: 30_000 });
    return { ...status, stdout: p.stdout, stderr: p.stderr, stillRunning, readiness };
  } finally {
    await p.kill9();
  }
}
