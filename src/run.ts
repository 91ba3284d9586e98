/**
 * The process after start-up: opens the buffer, serves /metrics and /healthz, and runs the
 * supervisor until SIGTERM/SIGINT. Loaded by main.ts once the reader threads are starting.
 */
import type http from 'node:http';
import pRetry from 'p-retry';
import type { Piscina } from 'piscina';
import type { Config } from './config.js';
import { isFatal } from './errors.js';
import { die, EXIT_ERROR, EXIT_OK, EXIT_USAGE, oneLine } from './exit.js';
import { startHttpServer } from './http.js';
import { createLogger, safeConnection, type Logger } from './logger.js';
import { Metrics } from './metrics.js';
import { Supervisor } from './supervisor.js';
import { BufferStore } from './buffer/store.js';

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

export async function run(config: Config, pool: Piscina): Promise<void> {
  // Process-wide lines carry no `source`; each source's lines get it once, from its child logger.
  const log = createLogger(config.logLevel);
  log.info({ sources: config.sources.map((s) => s.id) }, 'philotes starting');

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
