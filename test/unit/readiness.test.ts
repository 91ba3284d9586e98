/**
 * When a source counts as ready: the outage clock starts at the first failure after it last
 * streamed steadily, and neither retries nor short reconnections reset it.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { LeaseKeeper } from '../../src/supervisor/lease-keeper.js';
import type { BatchWriter } from '../../src/supervisor/batch-writer.js';
import type { BufferStore } from '../../src/buffer/store.js';
import type { ReaderThreads } from '../../src/supervisor/reader-pool.js';
import { loadConfig } from '../../src/common/config.js';
import { createLogger } from '../../src/common/logger.js';
import { Metrics } from '../../src/http/metrics.js';
import { backoffDelay, SourceRunner, WalClock } from '../../src/supervisor/source-runner.js';
import { plural, summarize } from '../../src/http/status-page.js';

const GRACE_S = 60;

function runner(startedAt: number): SourceRunner {
  const config = loadConfig({
    PHILOTES_CDC_SOURCE_DATABASE: 'app',
    PHILOTES_CDC_SOURCE_USER: 'cdc',
    PHILOTES_BUFFER_DATABASE: 'buffer',
    PHILOTES_BUFFER_USER: 'philotes',
    PHILOTES_READINESS_GRACE: `${GRACE_S}s`,
  });
  // The runner is only driven through its states here: no thread pool or buffer is touched.
  return new SourceRunner(
    config.sources[0]!,
    config,
    {} as ReaderThreads,
    {} as BufferStore,
    {} as BatchWriter,
    { ownerOf: () => null } as unknown as LeaseKeeper,
    new Metrics(),
    createLogger('silent'),
    startedAt,
  );
}

describe('source readiness', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.setSystemTime(1_000_000);
  });
  afterEach(() => {
    vi.useRealTimers();
  });
  const at = (s: number) => vi.setSystemTime(1_000_000 + s * 1000);

  it('a source that never streams is ready only during the grace period after start', () => {
    const r = runner(Date.now());
    at(59);
    r.setState('backoff');
    expect(r.isReady()).toBe(true);
    at(61);
    r.setState('starting');
    expect(r.isReady()).toBe(false);
    expect(r.report().notStreamingSeconds).toBe(61);
  });

  it('one hiccup while streaming steadily never shows', () => {
    const r = runner(Date.now());
    r.setState('streaming');
    at(100);
    expect(r.isReady()).toBe(true);
    r.setState('backoff');
    at(101);
    r.setState('streaming');
    for (const s of [110, 140, 159, 161, 200]) {
      at(s);
      expect(r.isReady(), `at ${s}s`).toBe(true);
    }
    expect(r.report().attempts).toBe(0);
  });

  it('reconnections that fail again soon after do not end the outage', () => {
    const r = runner(Date.now());
    r.setState('streaming');
    at(100);
    r.setState('backoff'); // the outage starts here
    for (let s = 101; s < 200; s += 10) {
      at(s);
      r.setState('streaming');
      at(s + 5); // fails again after 5 s, less than the 30 s that count as steady
      r.setState('backoff');
      at(s + 6);
      expect(r.isReady(), `at ${s + 6}s`).toBe(s + 6 - 100 < GRACE_S);
    }
    // Streaming steadily for half the grace ends it.
    at(300);
    r.setState('streaming');
    at(331);
    expect(r.isReady()).toBe(true);
    expect(r.report().notStreamingSeconds).toBeNull();
  });

  it('a failed source is never ready', () => {
    const r = runner(Date.now());
    r.setState('failed');
    expect(r.isReady()).toBe(false);
  });

  it('backoff doubles from the minimum to the maximum, jittered between half and all of it', () => {
    for (let attempt = 1; attempt <= 12; attempt++) {
      const ceiling = Math.min(30_000, 500 * 2 ** (attempt - 1));
      for (let i = 0; i < 20; i++) {
        const d = backoffDelay(attempt, 500, 30_000);
        expect(d).toBeGreaterThanOrEqual(ceiling / 2);
        expect(d).toBeLessThanOrEqual(ceiling);
      }
    }
  });
});

describe('lag in seconds (WalClock)', () => {
  it('is how long ago the WAL end first went past the stored position, not the last commit', () => {
    const clock = new WalClock();
    clock.note(100n, 1_000);
    clock.note(100n, 5_000); // the end did not move: the first sample stands
    clock.note(200n, 9_000);
    clock.note(300n, 12_000);
    // Stored up to the end: no lag, however old the last commit.
    expect(clock.secondsSince(300n, 60_000)).toBe(0);
    // Stored up to 150: the end passed it first at 9 s.
    expect(clock.secondsSince(150n, 20_000)).toBe(11);
    expect(clock.secondsSince(100n, 20_000)).toBe(11);
    // Behind every sample kept: at least as old as the oldest.
    expect(clock.secondsSince(50n, 20_000)).toBe(19);
    expect(new WalClock().secondsSince(1n, 0)).toBeNull();
  });

  it('keeps a bounded history', () => {
    const clock = new WalClock(3);
    for (let i = 1; i <= 10; i++) clock.note(BigInt(i * 10), i * 1_000);
    // Only 80, 90, 100 are kept: position 15 is at least as old as the oldest of them.
    expect(clock.secondsSince(15n, 10_000)).toBe(2);
  });
});

describe('the status page headline (summarize)', () => {
  const report = (source: string, state: string) =>
    ({ source, state }) as unknown as Parameters<typeof summarize>[0]['sources'][number];
  const open = { state: 'open' };

  it('says what /readyz says first, then the truth about the sources and the buffer', () => {
    expect(summarize({ ready: true, buffer: open, sources: [report('a', 'streaming')] })).toEqual({
      text: 'ready: 1 of 1 source streaming',
      tone: 'ok',
    });
    expect(
      summarize({
        ready: true,
        buffer: open,
        sources: [report('a', 'streaming'), report('b', 'backoff')],
      }),
    ).toEqual({ text: 'ready: 1 of 2 sources streaming, 1 in backoff', tone: 'warn' });
    expect(
      summarize({
        ready: false,
        buffer: { state: 'unreachable' },
        sources: [report('a', 'failed'), report('b', 'failed'), report('c', 'streaming')],
      }),
    ).toEqual({
      text: 'not ready: 1 of 3 sources streaming, 2 failed, buffer unreachable',
      tone: 'bad',
    });
    // Every source streaming while the buffer is down is not green.
    expect(
      summarize({
        ready: true,
        buffer: { state: 'unreachable' },
        sources: [report('a', 'streaming')],
      }).tone,
    ).toBe('warn');
  });

  it('counts in words that agree with the number', () => {
    expect(plural(1, 'table')).toBe('1 table');
    expect(plural(0, 'table')).toBe('0 tables');
    expect(plural(2, 'source')).toBe('2 sources');
  });
});
