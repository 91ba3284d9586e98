/**
 * The real CLI as the benches run it: one source (`app` on `source`) into `buffer`, default
 * settings but snapshot: never, source id `bench`. PHILOTES_CDC_* settings in the bench's own environment pass
 * through (tuning experiments); `settings` override them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Cluster } from '../test/support/cluster.js';
import { PHILOTES_MAIN } from '../test/support/philotes.js';

export function spawnPhilotes(
  source: Cluster,
  buffer: Cluster,
  settings: Record<string, string> = {},
): ChildProcess {
  // PHILOTES_BENCH_NODE_FLAGS='--cpu-prof --cpu-prof-dir=/tmp/prof' profiles every thread.
  const nodeFlags = (process.env['PHILOTES_BENCH_NODE_FLAGS'] ?? '').split(' ').filter(Boolean);
  return spawn(process.execPath, [...nodeFlags, PHILOTES_MAIN], {
    env: {
      PATH: process.env['PATH'] ?? '',
      PHILOTES_CDC_SOURCE_URL: source.url('app'),
      PHILOTES_CDC_SOURCE_ID: 'bench',
      PHILOTES_BUFFER_URL: buffer.url('buffer'),
      PHILOTES_METRICS_PORT: '0',
      PHILOTES_LOG_LEVEL: process.env['PHILOTES_BENCH_LOG_LEVEL'] ?? 'warn',
      // The drains measure the stream: the backlog's rows are in the tables already, and an
      // initial snapshot (the default) would copy them alongside (bench/snapshot.ts sets it).
      PHILOTES_CDC_SNAPSHOT: 'never',
      ...(Object.fromEntries(
        Object.entries(process.env).filter(([k]) => k.startsWith('PHILOTES_CDC_')),
      ) as Record<string, string>),
      ...settings,
    },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
}
