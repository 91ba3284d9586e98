import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { killAllPhilotes, runPhilotesToExit, startPhilotes } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

// A stand-in for dist/src/main.js: JSON lines on stdout, a graceful SIGTERM, an exit code from
// the environment. Writes are split mid-line to exercise the line reassembly.
const FAKE_CLI = `
const log = (o) => process.stdout.write(JSON.stringify(o) + '\\n');
log({ msg: 'started', secret: process.env.SECRET ?? null, inherited: process.env.VITEST ?? null });
process.stdout.write('{"msg":"split');
setTimeout(() => process.stdout.write(' line"}\\nnot json\\n'), 20);
process.stderr.write('a warning\\n');
if (process.env.EXIT_WITH) {
  setTimeout(() => process.exit(Number(process.env.EXIT_WITH)), 50);
} else {
  const t = setInterval(() => log({ msg: 'tick' }), 20);
  process.on('SIGTERM', () => { clearInterval(t); log({ msg: 'stopping' }); process.exitCode = 0; });
}
`;

const dir = mkdtempSync(join(tmpdir(), 'philotes-helper-'));
const script = join(dir, 'fake-cli.mjs');
writeFileSync(script, FAKE_CLI);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('philotes process helper', () => {
  it('captures JSON lines, waits for a log line and stops on SIGTERM', async () => {
    const p = startPhilotes({ SECRET: 's3' }, { script });
    expect(p.pid).toBeGreaterThan(0);
    const split = await p.waitForLog((e) => e['msg'] === 'split line', 10_000);
    expect(split).toEqual({ msg: 'split line' });
    // Only the env we pass (plus PATH and HOME) reaches the child.
    expect(p.logs()[0]).toEqual({ msg: 'started', secret: 's3', inherited: null });
    await waitFor(() => p.logs().some((e) => e['msg'] === 'tick'), { what: 'a tick' });

    expect(p.signal('SIGTERM')).toBe(true);
    expect(await p.exited).toEqual({ code: 0, signal: null });
    expect(p.logs().at(-1)).toEqual({ msg: 'stopping' });
    expect(p.stdout).toContain('not json');
    expect(p.stderr).toEqual(['a warning']);
  });

  it('kill9 ends the process and waitForLog rejects when it exits first', async () => {
    const p = startPhilotes({}, { script });
    const never = p.waitForLog((e) => e['msg'] === 'never', 10_000);
    await p.kill9();
    expect(await p.exited).toEqual({ code: null, signal: 'SIGKILL' });
    await expect(never).rejects.toThrow(/exited \(code null, signal SIGKILL\)/);
  });

  it('runPhilotesToExit returns the exit code and output', async () => {
    const run = await runPhilotesToExit({ EXIT_WITH: '3' }, 10_000, { script });
    expect(run.code).toBe(3);
    expect(run.stdout[0]).toContain('"started"');
    expect(run.stderr).toEqual(['a warning']);
  });

  it('runPhilotesToExit kills and rejects at its timeout', async () => {
    // Long enough for a node to start on a loaded machine and print (CI once saw none in 300 ms).
    await expect(runPhilotesToExit({}, 3_000, { script })).rejects.toThrow(
      /did not exit within 3000ms[\s\S]*tick/,
    );
    expect(await killAllPhilotes()).toBe(0);
  });

  it('waitFor reports what it waited for and the last error', async () => {
    let n = 0;
    await expect(
      waitFor(
        () => {
          n++;
          throw new Error(`attempt ${n}`);
        },
        { what: 'the impossible', timeoutMs: 200, intervalMs: 20 },
      ),
    ).rejects.toThrow(
      /^timed out after 200ms waiting for the impossible; last error: attempt \d+$/,
    );
    // A call that never settles still times out at the deadline.
    await expect(
      waitFor(() => new Promise<never>(() => undefined), { what: 'a hang', timeoutMs: 100 }),
    ).rejects.toThrow(/timed out after 100ms waiting for a hang; last error: none/);
  });
});
