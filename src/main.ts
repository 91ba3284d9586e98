#!/usr/bin/env node
/**
 * philotes-worker: reads configuration, opens the buffer, serves /metrics and /healthz, and runs
 * the supervisor until SIGTERM/SIGINT. Exit codes: 0 after a clean stop, 2 for configuration or
 * source errors a person must fix, 1 for anything else.
 */
import type http from 'node:http';
import pRetry from 'p-retry';
import { ConfigError, loadConfig, type Config } from './config.js';
import { isFatal } from './errors.js';
import { startHttpServer } from './http.js';
import { createLogger, safeConnection, type Logger } from './logger.js';
import { Metrics } from './metrics.js';
import { createReaderPool, Supervisor } from './supervisor.js';
import { BufferStore } from './buffer/store.js';

const EXIT_OK = 0;
const EXIT_ERROR = 1;
const EXIT_USAGE = 2;

function oneLine(message: string): string {
  return message.replace(/\s*\n\s*/g, ' ');
}

function die(code: number, message: string): never {
  process.stderr.write(`philotes: ${oneLine(message)}\n`);
  process.exit(code);
}

async function openBuffer(config: Config, log: Logger): Promise<BufferStore> {
  log.info({ buffer: safeConnection(config.buffer) }, 'connecting to buffer database');
  // The buffer may come up after us (compose, k8s): retry what can pass, for about a minute.
  return pRetry(() => BufferStore.open(config.buffer, log, config.sources.length + 2), {
    retries: 8,
    minTimeout: 500,
    maxTimeout: 15_000,
    randomize: true,
    shouldRetry: ({ error }) => !isFatal(error),
    onFailedAttempt: ({ error, retriesLeft }) =>
      log.warn({ err: error, retriesLeft }, 'buffer database not reachable yet'),
  });
}

async function main(): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (error) {
    if (error instanceof ConfigError) die(EXIT_USAGE, error.message);
    throw error;
  }
  const log = createLogger(config.logLevel, { source: config.sources.map((s) => s.id).join(',') });
  log.info({ sources: config.sources.length }, 'philotes starting');

  const pool = createReaderPool(config.sources.length);
  let store: BufferStore;
  try {
    store = await openBuffer(config, log);
  } catch (error) {
    const message = `buffer database ${config.buffer.host}:${config.buffer.port}/${config.buffer.database}: ${(error as Error).message}`;
    log.error({ err: error }, 'cannot open buffer database');
    die(isFatal(error) ? EXIT_USAGE : EXIT_ERROR, message);
  }

  const metrics = new Metrics();
  const supervisor = new Supervisor(config, pool, store, metrics, log);
  let server: http.Server | null = null;
  if (config.metricsPort !== 0) {
    try {
      server = await startHttpServer(
        config.metricsHost,
        config.metricsPort,
        metrics,
        () => {
          const sources = supervisor.runners.map((r) => r.health());
          return { healthy: sources.every((s) => s.healthy), sources };
        },
        log,
      );
    } catch (error) {
      die(EXIT_USAGE, `PHILOTES_METRICS_PORT ${config.metricsPort}: ${(error as Error).message}`);
    }
  }

  let shuttingDown: Promise<void> | null = null;
  const shutdown = (reason: string): Promise<void> => {
    shuttingDown ??= (async () => {
      log.info({ reason }, 'shutting down: stopping readers');
      const deadline = setTimeout(() => {
        log.error(
          { timeoutMs: config.shutdownTimeoutMs },
          'shutdown deadline passed; forcing exit',
        );
        process.exit(EXIT_ERROR);
      }, config.shutdownTimeoutMs);
      deadline.unref();
      await supervisor.stop();
      log.info('readers stopped; closing');
      await supervisor.close();
      await store.close();
      await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
      clearTimeout(deadline);
      log.info('shutdown complete');
    })();
    return shuttingDown;
  };

  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    signals++;
    if (signals > 1) {
      log.warn({ signal }, 'second signal: exiting now (the checkpoint keeps what is stored safe)');
      process.exit(130);
    }
    void shutdown(signal).then(() => process.exit(EXIT_OK));
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  const failures = await supervisor.run();
  if (shuttingDown) return; // the signal handler exits once shutdown completes
  if (failures.length > 0) {
    // Every source has failed for good (run() only returns once all runners ended).
    await shutdown('all sources failed');
    for (const { source, error } of failures) {
      process.stderr.write(`philotes: source "${source}": ${oneLine(error.message)}\n`);
    }
    process.exit(failures.every((f) => isFatal(f.error)) ? EXIT_USAGE : EXIT_ERROR);
  }
}

main().catch((error: unknown) => {
  process.stderr.write(
    `philotes: ${oneLine(error instanceof Error ? error.message : String(error))}\n`,
  );
  process.exit(EXIT_ERROR);
});
