/**
 * The command line as an operator meets it: --help and --version never touch a database, a
 * misspelt command or flag is an error with a hint (exit 2), print-config hides every secret, and
 * status reads each source's checkpoint and slot without changing anything (exit 1 when something
 * cannot be read).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ITEMS_DDL, startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { outputTail, waitForExit } from '../support/faults.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');

/** An environment whose databases do not exist: any attempt to connect would fail loudly. */
async function nowhere(): Promise<Record<string, string>> {
  const closed = String(await freePort());
  return {
    PHILOTES_CDC_SOURCE_PORT: closed,
    PHILOTES_CDC_SOURCE_DATABASE: 'app',
    PHILOTES_CDC_SOURCE_USER: 'cdc',
    PHILOTES_CDC_SOURCE_PASSWORD: 'source-secret',
    PHILOTES_BUFFER_PORT: closed,
    PHILOTES_BUFFER_DATABASE: 'buffer',
    PHILOTES_BUFFER_USER: 'philotes',
    PHILOTES_BUFFER_PASSWORD: 'buffer-secret',
  };
}

describe('the command line without a database', () => {
  it('--help explains every command and exits 0 without connecting anywhere', async () => {
    const env = await nowhere();
    for (const args of [['--help'], ['run', '--help'], ['status', '--help'], ['help']]) {
      const r = await runPhilotesToExit(env, 20_000, { args });
      expect(r.code, args.join(' ')).toBe(0);
      const text = [...r.stdout, ...r.stderr].join('\n');
      expect(text).toContain('Usage: philotes-worker');
      // A connection attempt would log 'connecting to ...' or fail with 'refused'.
      expect(text).not.toMatch(/connecting to|refused/i);
    }
    const top = (await runPhilotesToExit(env, 20_000, { args: ['--help'] })).stdout.join('\n');
    for (const command of ['run', 'check', 'status', 'print-config', 'reset-source']) {
      expect(top).toContain(command);
    }
  });

  it('--version prints the version', async () => {
    const r = await runPhilotesToExit(await nowhere(), 20_000, { args: ['--version'] });
    expect(r.code).toBe(0);
    expect(r.stdout.join('')).toMatch(/^\d+\.\d+\.\d+/);
  });

  it('-v prints the version too', async () => {
    const r = await runPhilotesToExit(await nowhere(), 20_000, { args: ['-v'] });
    expect(r.code).toBe(0);
    expect(r.stdout.join('\n')).toMatch(/^\d+\.\d+\.\d+$/m);
  });

  it('a misspelt command or an unknown flag is an error with a hint, exit 2', async () => {
    const env = await nowhere();
    const command = await runPhilotesToExit(env, 20_000, { args: ['stauts'] });
    expect(command.code).toBe(2);
    expect(command.stderr.join('\n')).toContain(
      'unknown command "stauts" (did you mean "status"?)',
    );
    const flag = await runPhilotesToExit(env, 20_000, { args: ['--jsn'] });
    expect(flag.code).toBe(2);
    expect(flag.stderr.join('\n')).toMatch(/unknown option '--jsn'/);
    // A hint to --help, not the help text under the error.
    expect(flag.stderr.join('\n')).toContain('philotes-worker --help lists the commands');
    expect(flag.stderr.join('\n')).not.toMatch(/^Usage:/m);
  });

  it('print-config prints a file --config accepts, with no secret, that prints the same again', async () => {
    const env = await nowhere();
    const yaml = await runPhilotesToExit(env, 20_000, { args: ['print-config'] });
    expect(yaml.code).toBe(0);
    const text = yaml.stdout.join('\n');
    expect(text).toContain('checkpointInterval: 10s');
    expect(text).toMatch(/^# To run it: set SOURCE_PHILOTES_CDC_PASSWORD to the password/m);
    const json = await runPhilotesToExit(env, 20_000, { args: ['print-config', '--json'] });
    expect(json.code).toBe(0);
    const config = JSON.parse(json.stdout.join('\n')) as {
      sources: Array<{ passwordEnv: string }>;
    };
    expect(config.sources[0]!.passwordEnv).toBe('SOURCE_PHILOTES_CDC_PASSWORD');
    for (const out of [yaml, json]) {
      const all = [...out.stdout, ...out.stderr].join('\n');
      expect(all).not.toContain('source-secret');
      expect(all).not.toContain('buffer-secret');
    }
    // Fed back as it is (the buffer stays in PHILOTES_BUFFER_*; the source's password in the
    // variable the comment names), it prints the same configuration.
    const dir = mkdtempSync(join(tmpdir(), 'philotes-print-'));
    try {
      const path = join(dir, 'printed.yaml');
      writeFileSync(path, `${text}\n`);
      const fileEnv = Object.fromEntries(
        Object.entries(env).filter(([key]) => !key.startsWith('PHILOTES_CDC_')),
      );
      const again = await runPhilotesToExit(
        { ...fileEnv, SOURCE_PHILOTES_CDC_PASSWORD: 'source-secret' },
        20_000,
        { args: ['print-config', '--config', path] },
      );
      expect(again.code, again.stderr.join('\n')).toBe(0);
      const body = (lines: string[]) => lines.filter((l) => !l.startsWith('#')).join('\n');
      expect(body(again.stdout)).toBe(body(yaml.stdout).replace(/\n+$/, ''));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('npm start', () => {
  it('passes SIGTERM to the worker: none is left behind holding a slot', async () => {
    const child = spawn('npm', ['start', '--silent'], {
      cwd: REPO_ROOT,
      // The buffer is unreachable: the worker waits for it, running, until it is stopped.
      env: {
        PATH: process.env['PATH'] ?? '',
        HOME: process.env['HOME'] ?? '',
        ...(await nowhere()),
        PHILOTES_METRICS_PORT: '0',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    // pino writes the worker's own pid on every line.
    const pid = await waitFor(
      async () => {
        const line = out.split('\n').find((l) => l.includes('connecting to buffer database'));
        return line ? (JSON.parse(line) as { pid: number }).pid : false;
      },
      { what: 'the worker to start under npm', timeoutMs: 30_000 },
    );
    expect(pid).not.toBe(child.pid);
    child.kill('SIGTERM');
    await exited;
    await waitFor(
      async () => {
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true; // ESRCH: gone
        }
      },
      { what: `the worker (pid ${pid}) to exit after npm got SIGTERM`, timeoutMs: 15_000 },
    );
  });
});

describe('philotes-worker status', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  interface StatusReport {
    buffer: string | null;
    members: Array<Record<string, unknown>>;
    sources: Array<{
      source: string;
      owner: string | null;
      checkpointLsn: string | null;
      slotActive: boolean | null;
      slotOwner: string | null;
      walStatus: string | null;
      lagBytes: number | null;
      problem: string | null;
      snapshot: { id: number; reason: string; state: string; rows: number } | null;
    }>;
  }

  it('reads the checkpoint and the slot of a streaming source, as a table and as JSON', async () => {
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    await f.source.query(`INSERT INTO items (client, name) VALUES (1, 'a'), (1, 'b')`, [], 'app');
    const json = await waitFor(
      async () => {
        const r = await runPhilotesToExit(f.env(), 30_000, { args: ['status', '--json'] });
        const report = JSON.parse(r.stdout.join('\n')) as StatusReport;
        return r.code === 0 && report.sources[0]?.checkpointLsn ? report : false;
      },
      { what: 'status to show a checkpoint', timeoutMs: 30_000 },
    );
    expect(json.buffer).toBeNull();
    expect(json.sources[0]).toMatchObject({
      source: 'app',
      slotActive: true,
      walStatus: 'reserved',
      problem: null,
    });
    expect(json.sources[0]!.slotOwner).toContain('philotes:app');
    expect(json.sources[0]!.lagBytes).toBeGreaterThanOrEqual(0);
    // The replica that holds the lease, and the replicas on the buffer.
    expect(json.sources[0]!.owner).toBe(`${hostname()}:${philotes.pid}`);
    expect(json.members).toEqual([
      expect.objectContaining({ pid: philotes.pid, role: 'capture', live: true, sources: 1 }),
    ]);

    const table = await runPhilotesToExit(f.env(), 30_000, { args: ['status'] });
    expect(table.code, outputTail(philotes)).toBe(0);
    expect(table.stdout[0]).toMatch(/^SOURCE\s+CHECKPOINT\s+STORED\s+LAG/);
    expect(table.stdout.find((l) => l.startsWith('app '))).toMatch(/active: philotes:app/);
    expect(table.stdout.find((l) => l.startsWith('app '))).toContain(
      `${hostname()}:${philotes.pid}`,
    );
    expect(table.stdout.find((l) => l.startsWith('REPLICA'))).toMatch(/^REPLICA\s+ROLE/);
    expect(json.sources[0]!.snapshot).toBeNull(); // snapshot: never

    // A snapshot asked for through the buffer's API shows in status once the worker ran it.
    await f.buffer.query(`SELECT philotes_request_snapshot('app')`, [], 'buffer');
    const after = await waitFor(
      async () => {
        const r = await runPhilotesToExit(f.env(), 30_000, { args: ['status', '--json'] });
        const report = JSON.parse(r.stdout.join('\n')) as StatusReport;
        return report.sources[0]?.snapshot?.state === 'done' ? report : false;
      },
      { what: 'status to show the finished snapshot', timeoutMs: 30_000 },
    );
    expect(after.sources[0]!.snapshot).toMatchObject({ reason: 'on_demand', rows: 2 });
    const again = await runPhilotesToExit(f.env(), 30_000, { args: ['status'] });
    expect(again.stdout.find((l) => l.startsWith('app '))).toMatch(/#\d+ on_demand done, 2 rows/);
  });

  it('a source nobody streams is a problem, and a slot gone under the checkpoint is the fatal state a start would meet', async () => {
    await philotes?.kill9();
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    expect(philotes.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(philotes, 30_000)).toEqual({ code: 0, signal: null });
    const stopped = await runPhilotesToExit(f.env(), 30_000, { args: ['status', '--json'] });
    expect(stopped.code).toBe(1);
    const idle = JSON.parse(stopped.stdout.join('\n')) as StatusReport;
    expect(idle.sources[0]!.problem).toMatch(/^not streaming: no client streams slot philotes_cdc/);

    await f.source.query(`SELECT pg_drop_replication_slot('philotes_cdc')`, [], 'app');
    const gone = await runPhilotesToExit(f.env(), 30_000, { args: ['status', '--json'] });
    expect(gone.code).toBe(1);
    const missing = JSON.parse(gone.stdout.join('\n')) as StatusReport;
    expect(missing.sources[0]!.problem).toMatch(/^SLOT_MISSING: /);
    expect(missing.sources[0]!.problem).toContain(
      'way out: philotes-worker reset-source --source app --accept-gap',
    );
    // Put the slot back where the buffer's record is, for what follows.
    const table = await runPhilotesToExit(f.env(), 30_000, { args: ['status'] });
    expect(table.stdout.find((l) => l.startsWith('app '))).toMatch(/SLOT_MISSING/);
    const reset = await runPhilotesToExit(f.env(), 60_000, {
      args: ['reset-source', '--source', 'app', '--accept-gap'],
    });
    expect(reset.code, reset.stderr.join('\n')).toBe(0);
  });

  it('says which source it cannot read, and exits 1', async () => {
    const closed = String(await freePort());
    const r = await runPhilotesToExit(f.env({ PHILOTES_CDC_SOURCE_PORT: closed }), 30_000, {
      args: ['status', '--json'],
    });
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout.join('\n')) as StatusReport;
    expect(report.sources[0]!.problem).toMatch(/refused by source/);
    // The buffer was still read: the problem is the source's own, not the buffer's.
    expect(report.buffer).toBeNull();
  });
});
