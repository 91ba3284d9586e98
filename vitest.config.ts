import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests start real PostgreSQL clusters and child processes.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    // Child processes, not threads: tests spawn servers and signal processes, and a fork's
    // 'exit' hook (see test/support) is what stops leftovers.
    pool: 'forks',
    // The machine (and CI) has 2 cores.
    maxWorkers: 2,
    setupFiles: ['test/support/setup.ts'],
  },
});
